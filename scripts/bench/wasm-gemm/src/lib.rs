//! `run(m, n, k, reps)`: C (m x n) = A (m x k) B (k x n), row-major f32, on one thread through the gemm crate,
//! `reps` times; run.mjs times the calls.
use std::cell::RefCell;

thread_local! {
    static BUFS: RefCell<(Vec<f32>, Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

#[no_mangle]
pub extern "C" fn run(m: usize, n: usize, k: usize, reps: usize) -> f32 {
    BUFS.with(|bufs| {
        let (a, b, c) = &mut *bufs.borrow_mut();
        *a = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        *b = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
        *c = vec![0.0; m * n];
        for _ in 0..reps {
            // SAFETY: the three buffers hold m*k, k*n and m*n elements with these row-major strides.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    c.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    a.as_ptr(),
                    1,
                    k as isize,
                    b.as_ptr(),
                    1,
                    n as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        }
        c[0]
    })
}
