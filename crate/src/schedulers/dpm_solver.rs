//! DPM-Solver++ (Lu et al. 2022), second order multistep with the midpoint solver, optionally on Karras
//! sigmas: diffusers' `DPMSolverMultistepScheduler` with its defaults (`algorithm_type="dpmsolver++"`,
//! `solver_order=2`, `lower_order_final=True`, `final_sigmas_type="zero"`).

use super::{
    Common, Scheduler, SchedulerConfig, Spacing, StepPlan, Term, interp, karras, linspace, log_f32, round_even,
    sigma_to_t,
};
use crate::error::{Error, Result};

pub struct DpmSolverMultistep {
    common: Common,
    timesteps: Vec<f64>,
    /// One per timestep plus the final one.
    sigmas: Vec<f64>,
    lower_order_final: bool,
    euler_at_final: bool,
    lower_order_nums: usize,
}

impl DpmSolverMultistep {
    pub fn new(common: Common, config: &SchedulerConfig, steps: usize, karras_sigmas: bool) -> Result<Self> {
        common.check_steps(steps)?;
        let algorithm = config.algorithm_type.as_deref().unwrap_or("dpmsolver++");
        let solver = config.solver_type.as_deref().unwrap_or("midpoint");
        if algorithm != "dpmsolver++" || solver != "midpoint" || config.solver_order.unwrap_or(2) != 2 {
            return Err(Error::Invalid(format!(
                "DPM-Solver: only dpmsolver++ / midpoint / order 2 is supported (config has {algorithm} / {solver} / {})",
                config.solver_order.unwrap_or(2)
            )));
        }
        let t = common.train_steps;
        let mut timesteps: Vec<f64> = match common.spacing {
            Spacing::Linspace => {
                let mut v: Vec<f64> = linspace(0.0, (t - 1) as f64, steps + 1).into_iter().map(round_even).collect();
                v.reverse();
                v.pop();
                v
            }
            Spacing::Leading => {
                let ratio = t / (steps + 1);
                (1..=steps).rev().map(|i| (i * ratio + common.steps_offset) as f64).collect()
            }
            Spacing::Trailing => {
                let ratio = t as f64 / steps as f64;
                super::ddim::arange_desc(t as f64, ratio).into_iter().map(|v| round_even(v) - 1.0).collect()
            }
        };
        let train_sigmas = common.train_sigmas();
        let log_sigmas = log_f32(&train_sigmas);
        let mut sigmas: Vec<f64> = if karras_sigmas {
            let k = karras(train_sigmas[0], train_sigmas[t - 1], steps);
            // diffusers rounds, except for the cosine schedule, whose fractional timesteps the int64 cast truncates.
            let cosine = config.beta_schedule.as_deref() == Some("squaredcos_cap_v2");
            timesteps = k
                .iter()
                .map(|s| {
                    let t = sigma_to_t(*s, &log_sigmas);
                    if cosine { t.trunc() } else { round_even(t) }
                })
                .collect();
            k
        } else {
            timesteps.iter().map(|ts| interp(*ts, &train_sigmas)).collect()
        };
        let last = match config.final_sigmas_type.as_deref().unwrap_or("zero") {
            "zero" => 0.0,
            "sigma_min" => train_sigmas[0],
            s => {
                return Err(Error::Invalid(format!("DPM-Solver: unknown final_sigmas_type {s:?}")));
            }
        };
        sigmas.push(last);
        // diffusers stores sigmas as f32.
        let sigmas = sigmas.into_iter().map(|s| s as f32 as f64).collect();
        Ok(Self {
            common,
            timesteps,
            sigmas,
            lower_order_final: config.lower_order_final.unwrap_or(true),
            euler_at_final: config.euler_at_final.unwrap_or(false),
            lower_order_nums: 0,
        })
    }
}

/// (alpha_t, sigma_t, lambda_t) of a Karras sigma: alpha = 1 / sqrt(sigma^2 + 1), sigma_t = sigma * alpha.
fn alpha_sigma_lambda(sigma: f64) -> (f64, f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    let sigma_t = sigma * alpha;
    (alpha, sigma_t, alpha.ln() - sigma_t.ln())
}

impl Scheduler for DpmSolverMultistep {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn input_scale(&self, _i: usize) -> f64 {
        1.0
    }

    fn noising(&self, i: usize) -> (f64, f64) {
        let sigma = self.sigmas[i] as f32;
        let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
        (alpha as f64, (sigma * alpha) as f64)
    }

    fn step(&mut self, i: usize) -> StepPlan {
        let n = self.timesteps.len();
        let (alpha_s0, sigma_s0, lambda_s0) = alpha_sigma_lambda(self.sigmas[i]);
        // 1. The data prediction x0 (dpmsolver++ works on x0 whatever the model predicts).
        let x0 = match self.common.prediction {
            super::Prediction::Epsilon => {
                vec![(Term::Sample, 1.0 / alpha_s0), (Term::ModelOutput, -sigma_s0 / alpha_s0)]
            }
            super::Prediction::VPrediction => {
                vec![(Term::Sample, alpha_s0), (Term::ModelOutput, -sigma_s0)]
            }
            super::Prediction::Sample => vec![(Term::ModelOutput, 1.0)],
        };
        // 2. First order on the first step and (with few steps or a zero final sigma) the last one; second
        //    order otherwise. (diffusers' lower_order_second only matters for order 3.)
        let final_zero = self.sigmas[n] == 0.0;
        let lower_final = i == n - 1 && (self.euler_at_final || (self.lower_order_final && n < 15) || final_zero);
        let (alpha_t, sigma_t, lambda_t) = alpha_sigma_lambda(self.sigmas[i + 1]);
        let h = lambda_t - lambda_s0;
        let em1 = (-h).exp() - 1.0;
        let ratio = if sigma_s0 == 0.0 { 0.0 } else { sigma_t / sigma_s0 };
        let prev = if self.lower_order_nums < 1 || lower_final {
            vec![(Term::Sample, ratio), (Term::X0, -alpha_t * em1)]
        } else {
            let (_, _, lambda_s1) = alpha_sigma_lambda(self.sigmas[i - 1]);
            let r0 = (lambda_s0 - lambda_s1) / h;
            // D0 = x0, D1 = (x0 - prev_x0) / r0; x_t = ratio * x - a em1 D0 - 0.5 a em1 D1.
            let d1 = -0.5 * alpha_t * em1 / r0;
            vec![(Term::Sample, ratio), (Term::X0, -alpha_t * em1 + d1), (Term::PrevX0, -d1)]
        };
        if self.lower_order_nums < 2 {
            self.lower_order_nums += 1;
        }
        StepPlan { x0, prev }
    }
}
