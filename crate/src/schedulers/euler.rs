//! Euler and Euler ancestral samplers (Karras et al. 2022, k-diffusion), as diffusers'
//! `EulerDiscreteScheduler` (s_churn 0) and `EulerAncestralDiscreteScheduler`.

use super::{
    Common, Prediction, Scheduler, SchedulerConfig, Spacing, StepPlan, Term, interp, karras, linspace, log_f32,
    round_even, sigma_to_t,
};
use crate::error::{Error, Result};

/// Timesteps and sigmas (with the final 0) shared by both Euler samplers.
struct Schedule {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
}

fn schedule(common: &Common, config: &SchedulerConfig, steps: usize, allow_karras: bool) -> Result<Schedule> {
    common.check_steps(steps)?;
    if config.interpolation_type.as_deref().unwrap_or("linear") != "linear"
        || config.timestep_type.as_deref().unwrap_or("discrete") != "discrete"
    {
        return Err(Error::Invalid("Euler: only linear interpolation of discrete timesteps is supported".into()));
    }
    let t = common.train_steps;
    // diffusers computes these in f32.
    let mut timesteps: Vec<f64> = match common.spacing {
        Spacing::Linspace => linspace(0.0, (t - 1) as f64, steps).into_iter().rev().map(|v| v as f32 as f64).collect(),
        Spacing::Leading => {
            let ratio = t / steps;
            (0..steps).rev().map(|i| (i * ratio + common.steps_offset) as f64).collect()
        }
        Spacing::Trailing => {
            let ratio = t as f64 / steps as f64;
            super::ddim::arange_desc(t as f64, ratio).into_iter().map(|v| round_even(v) - 1.0).collect()
        }
    };
    let train_sigmas = common.train_sigmas();
    let mut sigmas: Vec<f64> = timesteps.iter().map(|ts| interp(*ts, &train_sigmas)).collect();
    if allow_karras && config.use_karras_sigmas.unwrap_or(false) {
        let log_sigmas = log_f32(&train_sigmas);
        sigmas = karras(sigmas[steps - 1], sigmas[0], steps);
        timesteps = sigmas.iter().map(|s| sigma_to_t(*s, &log_sigmas) as f32 as f64).collect();
    }
    let last = match config.final_sigmas_type.as_deref().unwrap_or("zero") {
        "zero" => 0.0,
        "sigma_min" => train_sigmas[0],
        s => {
            return Err(Error::Invalid(format!("Euler: unknown final_sigmas_type {s:?}")));
        }
    };
    sigmas.push(last);
    let sigmas: Vec<f64> = sigmas.into_iter().map(|s| s as f32 as f64).collect();
    let max = sigmas.iter().copied().fold(0.0, f64::max);
    let init_noise_sigma = match common.spacing {
        Spacing::Linspace | Spacing::Trailing => max,
        Spacing::Leading => (max * max + 1.0).sqrt(),
    };
    Ok(Schedule { timesteps, sigmas, init_noise_sigma })
}

/// x0 = sample - sigma * eps, or the v-prediction form, for a sigma of the k-diffusion parametrization.
fn x0_terms(prediction: Prediction, sigma: f64) -> Vec<(Term, f64)> {
    match prediction {
        Prediction::Epsilon => vec![(Term::Sample, 1.0), (Term::ModelOutput, -sigma)],
        Prediction::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            vec![(Term::ModelOutput, -sigma / s2.sqrt()), (Term::Sample, 1.0 / s2)]
        }
        Prediction::Sample => vec![(Term::ModelOutput, 1.0)],
    }
}

/// Euler's method on the probability-flow ODE.
pub struct EulerDiscrete {
    prediction: Prediction,
    s: Schedule,
}

impl EulerDiscrete {
    pub fn new(common: Common, config: &SchedulerConfig, steps: usize) -> Result<Self> {
        Ok(Self { s: schedule(&common, config, steps, true)?, prediction: common.prediction })
    }
}

impl Scheduler for EulerDiscrete {
    fn timesteps(&self) -> &[f64] {
        &self.s.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.s.init_noise_sigma
    }

    fn input_scale(&self, i: usize) -> f64 {
        1.0 / (self.s.sigmas[i].powi(2) + 1.0).sqrt()
    }

    /// k-diffusion's noising: x + sigma * noise.
    fn noising(&self, i: usize) -> (f64, f64) {
        (1.0, self.s.sigmas[i])
    }

    fn step(&mut self, i: usize) -> StepPlan {
        let (sigma, next) = (self.s.sigmas[i], self.s.sigmas[i + 1]);
        // prev = sample + (sample - x0) / sigma * (next - sigma)
        let dt = next - sigma;
        let x0 = x0_terms(self.prediction, sigma);
        StepPlan { x0, prev: vec![(Term::Sample, 1.0 + dt / sigma), (Term::X0, -dt / sigma)] }
    }
}

/// Euler with ancestral noise: steps down to sigma_down, then adds sigma_up of fresh noise.
pub struct EulerAncestral {
    prediction: Prediction,
    s: Schedule,
}

impl EulerAncestral {
    pub fn new(common: Common, config: &SchedulerConfig, steps: usize) -> Result<Self> {
        if common.prediction == Prediction::Sample {
            return Err(Error::Invalid("Euler ancestral: prediction_type \"sample\" is not supported".into()));
        }
        Ok(Self { s: schedule(&common, config, steps, false)?, prediction: common.prediction })
    }
}

impl Scheduler for EulerAncestral {
    fn timesteps(&self) -> &[f64] {
        &self.s.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.s.init_noise_sigma
    }

    fn input_scale(&self, i: usize) -> f64 {
        1.0 / (self.s.sigmas[i].powi(2) + 1.0).sqrt()
    }

    /// k-diffusion's noising: x + sigma * noise.
    fn noising(&self, i: usize) -> (f64, f64) {
        (1.0, self.s.sigmas[i])
    }

    fn step(&mut self, i: usize) -> StepPlan {
        let (from, to) = (self.s.sigmas[i], self.s.sigmas[i + 1]);
        let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let down = (to * to - up * up).sqrt();
        let dt = down - from;
        let x0 = x0_terms(self.prediction, from);
        StepPlan { x0, prev: vec![(Term::Sample, 1.0 + dt / from), (Term::X0, -dt / from), (Term::Noise, up)] }
    }
}
