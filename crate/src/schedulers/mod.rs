//! Noise schedulers, equal to diffusers' step by step. Pure CPU math on timesteps and sigmas: a step returns a
//! [`StepPlan`], the linear combination of latents it wants, and the pipeline evaluates it on the GPU (or on
//! the CPU in the fallback) with one `lincomb` op.
//!
//! A model's `scheduler_config.json` gives the defaults; another algorithm may be requested, which keeps the
//! config's values (betas, spacing, offsets) and takes the algorithm's own defaults for keys the file lacks,
//! as diffusers' `OtherScheduler.from_config(pipe.scheduler.config)` does.

mod ddim;
mod dpm_solver;
mod euler;
mod lcm;

use serde::Deserialize;

pub use ddim::Ddim;
pub use dpm_solver::DpmSolverMultistep;
pub use euler::{EulerAncestral, EulerDiscrete};
pub use lcm::Lcm;

use crate::error::{Error, Result};

/// The keys of diffusers' scheduler configs that our schedulers read; absent keys take each algorithm's
/// default.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub num_train_timesteps: Option<usize>,
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    pub beta_schedule: Option<String>,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: Option<String>,
    pub timestep_spacing: Option<String>,
    pub steps_offset: Option<usize>,
    pub set_alpha_to_one: Option<bool>,
    pub use_karras_sigmas: Option<bool>,
    pub final_sigmas_type: Option<String>,
    pub solver_order: Option<usize>,
    pub lower_order_final: Option<bool>,
    pub euler_at_final: Option<bool>,
    pub algorithm_type: Option<String>,
    pub solver_type: Option<String>,
    pub original_inference_steps: Option<usize>,
    pub timestep_scaling: Option<f64>,
    pub interpolation_type: Option<String>,
    pub timestep_type: Option<String>,
    pub rescale_betas_zero_snr: Option<bool>,
    pub thresholding: Option<bool>,
    pub clip_sample: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    pub use_lu_lambdas: Option<bool>,
}

impl SchedulerConfig {
    /// Parses a `scheduler_config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| Error::Invalid(format!("scheduler_config.json: {e}")))
    }

    /// The algorithm the config names, when we implement it (PNDM, the SD1.x default, runs as DDIM).
    pub fn default_kind(&self) -> Result<SchedulerKind> {
        let karras = self.use_karras_sigmas.unwrap_or(false);
        Ok(match self.class_name.as_deref().unwrap_or("DDIMScheduler") {
            "DDIMScheduler" | "PNDMScheduler" => SchedulerKind::Ddim,
            "EulerDiscreteScheduler" => SchedulerKind::Euler,
            "EulerAncestralDiscreteScheduler" => SchedulerKind::EulerAncestral,
            "DPMSolverMultistepScheduler" if karras => SchedulerKind::DpmPp2mKarras,
            "DPMSolverMultistepScheduler" => SchedulerKind::DpmPp2m,
            "LCMScheduler" => SchedulerKind::Lcm,
            other => {
                return Err(Error::Invalid(format!(
                    "the model's scheduler {other} is not supported; choose one of {}",
                    SchedulerKind::NAMES.join(", ")
                )));
            }
        })
    }
}

/// The scheduling algorithms, by the names the CLI and the page use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, Deserialize)]
pub enum SchedulerKind {
    #[serde(rename = "ddim")]
    Ddim,
    #[serde(rename = "euler")]
    Euler,
    #[serde(rename = "euler-a")]
    EulerAncestral,
    #[serde(rename = "dpm++2m")]
    DpmPp2m,
    #[serde(rename = "dpm++2m-karras")]
    DpmPp2mKarras,
    #[serde(rename = "lcm")]
    Lcm,
}

impl SchedulerKind {
    pub const NAMES: [&'static str; 6] = ["ddim", "euler", "euler-a", "dpm++2m", "dpm++2m-karras", "lcm"];
    const ALL: [SchedulerKind; 6] = [
        SchedulerKind::Ddim,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmPp2m,
        SchedulerKind::DpmPp2mKarras,
        SchedulerKind::Lcm,
    ];

    pub fn name(self) -> &'static str {
        Self::NAMES[Self::ALL.iter().position(|k| *k == self).expect("every kind is listed")]
    }

    /// Builds this algorithm from a model's config for `steps` inference steps.
    pub fn build(self, config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        let common = Common::new(config, self)?;
        Ok(match self {
            SchedulerKind::Ddim => Box::new(Ddim::new(common, config, steps)?),
            SchedulerKind::Euler => Box::new(EulerDiscrete::new(common, config, steps)?),
            SchedulerKind::EulerAncestral => Box::new(EulerAncestral::new(common, config, steps)?),
            SchedulerKind::DpmPp2m => Box::new(DpmSolverMultistep::new(common, config, steps, false)?),
            SchedulerKind::DpmPp2mKarras => Box::new(DpmSolverMultistep::new(common, config, steps, true)?),
            SchedulerKind::Lcm => Box::new(Lcm::new(common, config, steps)?),
        })
    }
}

impl SchedulerKind {
    /// Builds this algorithm for img2img with a latent consistency model, which takes the strength into its
    /// timesteps (diffusers' `LatentConsistencyModelImg2ImgPipeline`); only the LCM scheduler does.
    pub fn build_lcm_img2img(
        self,
        config: &SchedulerConfig,
        steps: usize,
        strength: f64,
    ) -> Result<Box<dyn Scheduler>> {
        if self != SchedulerKind::Lcm {
            return Err(Error::Invalid(format!(
                "img2img with a latent consistency model (LCM) runs the LCM scheduler, not {}",
                self.name()
            )));
        }
        Ok(Box::new(Lcm::with_strength(Common::new(config, self)?, config, steps, strength)?))
    }
}

impl std::str::FromStr for SchedulerKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::NAMES
            .iter()
            .position(|n| *n == s)
            .map(|i| Self::ALL[i])
            .ok_or_else(|| Error::Invalid(format!("unknown scheduler {s:?}; choose one of {}", Self::NAMES.join(", "))))
    }
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the model predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    VPrediction,
    Sample,
}

/// A latent a step combines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Term {
    /// The current latent x_t.
    Sample,
    /// The UNet's output (after guidance).
    ModelOutput,
    /// This step's prediction of the clean latent (computed first, from `x0`).
    X0,
    /// The previous step's `X0` (multistep solvers).
    PrevX0,
    /// Fresh standard normal noise of the latent's shape, drawn from the request's generator.
    Noise,
}

/// One scheduler step as linear combinations: first `x0 = sum(x0 terms)`, then `prev = sum(prev terms)`.
/// Coefficients are computed in f64 and applied in f32.
#[derive(Clone, Debug, PartialEq)]
pub struct StepPlan {
    pub x0: Vec<(Term, f64)>,
    pub prev: Vec<(Term, f64)>,
}

impl StepPlan {
    /// Whether the step draws noise (drawing advances the generator even when its coefficient is 0).
    pub fn needs_noise(&self) -> bool {
        self.prev.iter().any(|(t, _)| *t == Term::Noise)
    }

    /// Whether the step reads the previous step's x0.
    pub fn needs_prev_x0(&self) -> bool {
        self.prev.iter().any(|(t, _)| *t == Term::PrevX0)
    }
}

/// The latents a plan reads, on the CPU (the fallback path and the tests).
pub struct CpuLatents<'a> {
    pub sample: &'a [f32],
    pub model_output: &'a [f32],
    pub prev_x0: Option<&'a [f32]>,
    pub noise: Option<&'a [f32]>,
}

impl StepPlan {
    /// Evaluates the plan on CPU vectors: returns (x0, prev).
    pub fn apply_cpu(&self, l: &CpuLatents<'_>) -> Result<(Vec<f32>, Vec<f32>)> {
        let n = l.sample.len();
        let combine = |terms: &[(Term, f64)], x0: Option<&[f32]>| -> Result<Vec<f32>> {
            let mut out = vec![0f32; n];
            for &(term, c) in terms {
                let src = match term {
                    Term::Sample => Some(l.sample),
                    Term::ModelOutput => Some(l.model_output),
                    Term::X0 => x0,
                    Term::PrevX0 => l.prev_x0,
                    Term::Noise => l.noise,
                }
                .ok_or_else(|| Error::Invalid(format!("scheduler step needs {term:?}, which was not given")))?;
                for (o, v) in out.iter_mut().zip(src) {
                    *o += c as f32 * v;
                }
            }
            Ok(out)
        };
        let x0 = combine(&self.x0, None)?;
        let prev = combine(&self.prev, Some(&x0))?;
        Ok((x0, prev))
    }
}

/// A scheduler: the timesteps to run and, for each, how to scale the UNet input and how to step.
pub trait Scheduler {
    /// The timestep fed to the UNet at each step (diffusers' `scheduler.timesteps`).
    fn timesteps(&self) -> &[f64];
    /// The initial noise is scaled by this (diffusers' `init_noise_sigma`).
    fn init_noise_sigma(&self) -> f64;
    /// The UNet input at step `i` is the latent times this (diffusers' `scale_model_input`).
    fn input_scale(&self, i: usize) -> f64;
    /// The update at step `i`.
    fn step(&mut self, i: usize) -> StepPlan;
    /// diffusers' `add_noise` to step `i`'s noise level, as (a, b) in `noisy = a * clean + b * noise`: what
    /// img2img starts from (computed in f32, as torch does).
    fn noising(&self, i: usize) -> (f64, f64);
}

/// `add_noise` of the DDPM family (DDIM, LCM): sqrt(acp[t]) and sqrt(1 - acp[t]) at the integer timestep.
fn ddpm_noising(alphas_cumprod: &[f64], t: f64) -> (f64, f64) {
    let a = alphas_cumprod[(t as usize).min(alphas_cumprod.len() - 1)] as f32;
    (a.sqrt() as f64, (1.0 - a).sqrt() as f64)
}

/// What every algorithm derives from the config: betas, cumulative alphas, prediction type, spacing.
#[derive(Clone, Debug)]
pub struct Common {
    pub train_steps: usize,
    pub alphas_cumprod: Vec<f64>,
    pub prediction: Prediction,
    pub spacing: Spacing,
    pub steps_offset: usize,
}

/// diffusers' `timestep_spacing`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

impl Common {
    fn new(config: &SchedulerConfig, kind: SchedulerKind) -> Result<Self> {
        if config.rescale_betas_zero_snr.unwrap_or(false) {
            return Err(Error::Invalid("scheduler: rescale_betas_zero_snr is not supported".into()));
        }
        if config.thresholding.unwrap_or(false) {
            return Err(Error::Invalid("scheduler: thresholding is not supported".into()));
        }
        let train_steps = config.num_train_timesteps.unwrap_or(1000);
        if train_steps < 2 {
            return Err(Error::Invalid(format!("scheduler: num_train_timesteps {train_steps} is too small")));
        }
        let betas = betas(config, train_steps)?;
        // torch: alphas = 1 - betas in f32, cumprod accumulated in f64 and stored as f32.
        let mut acc = 1.0f64;
        let alphas_cumprod = betas
            .iter()
            .map(|b| {
                acc *= (1.0 - *b as f32) as f64;
                acc as f32 as f64
            })
            .collect();
        let prediction = match config.prediction_type.as_deref().unwrap_or("epsilon") {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::VPrediction,
            "sample" => Prediction::Sample,
            p => {
                return Err(Error::Invalid(format!("scheduler: unknown prediction_type {p:?}")));
            }
        };
        // Each diffusers class has its own default spacing.
        let default_spacing = match kind {
            SchedulerKind::Ddim | SchedulerKind::Lcm => "leading",
            _ => "linspace",
        };
        let spacing = match config.timestep_spacing.as_deref().unwrap_or(default_spacing) {
            "leading" => Spacing::Leading,
            "trailing" => Spacing::Trailing,
            "linspace" => Spacing::Linspace,
            s => {
                return Err(Error::Invalid(format!("scheduler: unknown timestep_spacing {s:?}")));
            }
        };
        Ok(Self { train_steps, alphas_cumprod, prediction, spacing, steps_offset: config.steps_offset.unwrap_or(0) })
    }

    /// sqrt((1 - acp) / acp) for every training timestep, in f32 as diffusers computes it.
    fn train_sigmas(&self) -> Vec<f64> {
        self.alphas_cumprod
            .iter()
            .map(|&a| {
                let a = a as f32;
                ((1.0 - a) / a).sqrt() as f64
            })
            .collect()
    }

    fn check_steps(&self, steps: usize) -> Result<()> {
        if steps == 0 || steps > self.train_steps {
            return Err(Error::Invalid(format!("steps must be between 1 and {}, got {steps}", self.train_steps)));
        }
        Ok(())
    }
}

fn betas(config: &SchedulerConfig, n: usize) -> Result<Vec<f64>> {
    if let Some(b) = &config.trained_betas {
        if b.len() != n {
            return Err(Error::Invalid(format!("scheduler: {} trained_betas for {n} timesteps", b.len())));
        }
        return Ok(b.clone());
    }
    let start = config.beta_start.unwrap_or(0.0001);
    let end = config.beta_end.unwrap_or(0.02);
    Ok(match config.beta_schedule.as_deref().unwrap_or("linear") {
        "linear" => linspace_f32(start, end, n),
        "scaled_linear" => {
            linspace_f32(start.sqrt(), end.sqrt(), n).into_iter().map(|b| ((b as f32) * (b as f32)) as f64).collect()
        }
        "squaredcos_cap_v2" => {
            let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
            (0..n)
                .map(|i| {
                    let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                    ((1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32) as f64
                })
                .collect()
        }
        s => {
            return Err(Error::Invalid(format!("scheduler: unknown beta_schedule {s:?}")));
        }
    })
}

/// `torch.linspace(start, end, n, dtype=float32)`: f32 values, the second half computed from the end.
fn linspace_f32(start: f64, end: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start as f32 as f64];
    }
    let (s, e) = (start as f32, end as f32);
    let step = (e - s) / (n - 1) as f32;
    let half = n / 2;
    (0..n).map(|i| if i < half { s + step * i as f32 } else { e - step * (n - 1 - i) as f32 } as f64).collect()
}

/// numpy's `linspace(start, end, n)` in f64.
fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f64;
    (0..n).map(|i| if i == n - 1 { end } else { start + step * i as f64 }).collect()
}

/// numpy's `round` (half to even).
fn round_even(x: f64) -> f64 {
    x.round_ties_even()
}

/// numpy's `interp(x, arange(len(ys)), ys)`.
fn interp(x: f64, ys: &[f64]) -> f64 {
    if x <= 0.0 {
        return ys[0];
    }
    let last = ys.len() - 1;
    if x >= last as f64 {
        return ys[last];
    }
    let i = x.floor() as usize;
    let w = x - i as f64;
    ys[i] + (ys[i + 1] - ys[i]) * w
}

/// Karras et al.'s schedule from sigma_max down to sigma_min (rho 7), as diffusers' `_convert_to_karras`.
fn karras(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    linspace(0.0, 1.0, n).into_iter().map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho)).collect()
}

/// `np.log` of diffusers' f32 sigmas: the logs are f32 too.
fn log_f32(sigmas: &[f64]) -> Vec<f64> {
    sigmas.iter().map(|&s| (s as f32).ln() as f64).collect()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep of `sigma` by log-linear interpolation.
fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    let low = log_sigmas.iter().rposition(|&l| log_sigma - l >= 0.0).unwrap_or(0).min(n - 2);
    let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// x0 = a * sample + b * model_output for the model's prediction type, given the step's sqrt(alpha_cumprod)
/// and sqrt(1 - alpha_cumprod) (the DDPM parametrization used by DDIM, DPM-Solver and LCM).
fn x0_terms(prediction: Prediction, sqrt_alpha: f64, sqrt_beta: f64) -> Vec<(Term, f64)> {
    match prediction {
        Prediction::Epsilon => vec![(Term::Sample, 1.0 / sqrt_alpha), (Term::ModelOutput, -sqrt_beta / sqrt_alpha)],
        Prediction::VPrediction => {
            vec![(Term::Sample, sqrt_alpha), (Term::ModelOutput, -sqrt_beta)]
        }
        Prediction::Sample => vec![(Term::ModelOutput, 1.0)],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spacing_helpers_match_numpy() {
        assert_eq!(linspace(0.0, 999.0, 4), vec![0.0, 333.0, 666.0, 999.0]);
        assert_eq!(round_even(2.5), 2.0);
        assert_eq!(interp(1.5, &[0.0, 1.0, 3.0]), 2.0);
        let log_sigmas: Vec<f64> = [0.1f64, 0.2, 0.4, 0.8].iter().map(|s| s.ln()).collect();
        assert!((sigma_to_t(0.2, &log_sigmas) - 1.0).abs() < 1e-12);
        assert!((sigma_to_t((0.2f64 * 0.4).sqrt(), &log_sigmas) - 1.5).abs() < 1e-12);
        assert_eq!(sigma_to_t(5.0, &log_sigmas), 3.0);
    }

    /// Every algorithm against diffusers' own trajectories (scripts/make-scheduler-fixtures): timesteps,
    /// init_noise_sigma, input scales and every step's latent, ancestral noise from the torch generator.
    #[test]
    fn trajectories_match_diffusers() {
        use crate::rng::TorchRng;
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/schedulers/trajectories.json");
        let text = std::fs::read_to_string(path).expect("scheduler fixtures");
        let fixtures: serde_json::Value = serde_json::from_str(&text).unwrap();
        let mut checked = 0;
        for case in fixtures["cases"].as_array().unwrap() {
            let label = format!("{} {} {} steps", case["algorithm"], case["config_name"], case["steps"]);
            if case.get("error").is_some() {
                continue;
            }
            let config: SchedulerConfig = serde_json::from_value(case["config"].clone()).unwrap();
            let kind: SchedulerKind = case["algorithm"].as_str().unwrap().parse().unwrap();
            let steps = case["steps"].as_u64().unwrap() as usize;
            let mut sched = kind.build(&config, steps).unwrap_or_else(|e| panic!("{label}: {e}"));
            let want_t: Vec<f64> = serde_json::from_value(case["timesteps"].clone()).unwrap();
            assert_eq!(sched.timesteps(), &want_t[..], "{label}: timesteps");
            let sigma = case["init_noise_sigma"].as_f64().unwrap();
            assert!((sched.init_noise_sigma() - sigma).abs() < 1e-4 * sigma, "{label}: init_noise_sigma");
            let mut rng = TorchRng::new(case["seed"].as_u64().unwrap());
            let n: usize = case["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).product();
            let init = rng.randn(n);
            let want_init: Vec<f32> = serde_json::from_value(case["init"].clone()).unwrap();
            // torch's vectorized path uses SIMD log/sin/cos: agreement is to float precision, not bitwise.
            for (g, w) in init.iter().zip(&want_init) {
                assert!((g - w).abs() <= 1e-6 * (1.0 + w.abs()), "{label}: initial noise {g} vs {w}");
            }
            let mut sample: Vec<f32> = init.iter().map(|v| v * sigma as f32).collect();
            let mut prev_x0: Option<Vec<f32>> = None;
            for (i, &t) in want_t.iter().enumerate() {
                let scale = sched.input_scale(i);
                let want_scale = case["scales"][i].as_f64().unwrap();
                assert!((scale - want_scale).abs() < 1e-6, "{label} step {i}: input scale {scale} vs {want_scale}");
                let out: Vec<f32> = sample
                    .iter()
                    .map(|&x| {
                        let x = x * scale as f32;
                        (x * 0.7 + 0.1).tanh() * (0.5 + t as f32 / 2000.0) - 0.05 * x
                    })
                    .collect();
                let plan = sched.step(i);
                let noise = plan.needs_noise().then(|| rng.randn(n));
                let latents = CpuLatents {
                    sample: &sample,
                    model_output: &out,
                    prev_x0: prev_x0.as_deref(),
                    noise: noise.as_deref(),
                };
                let (x0, prev) = plan.apply_cpu(&latents).unwrap_or_else(|e| panic!("{label}: {e}"));
                let want: Vec<f32> = serde_json::from_value(case["samples"][i].clone()).unwrap();
                for (j, (g, w)) in prev.iter().zip(&want).enumerate() {
                    assert!((g - w).abs() <= 2e-4 * (1.0 + w.abs()), "{label} step {i} [{j}]: {g} vs {w}");
                }
                sample = want;
                prev_x0 = Some(x0);
            }
            checked += 1;
        }
        assert!(checked >= 80, "only {checked} scheduler cases checked");
    }

    #[test]
    fn scheduler_names_round_trip() {
        for name in SchedulerKind::NAMES {
            assert_eq!(name.parse::<SchedulerKind>().unwrap().name(), name);
        }
        assert!("plms".parse::<SchedulerKind>().unwrap_err().to_string().contains("dpm++2m-karras"));
    }
}
