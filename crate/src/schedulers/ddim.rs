//! DDIM (Song et al. 2020) with eta 0, as diffusers' `DDIMScheduler`.

use super::{
    Common, Scheduler, SchedulerConfig, Spacing, StepPlan, Term, ddpm_noising, linspace, round_even, x0_terms,
};
use crate::error::Result;

pub struct Ddim {
    common: Common,
    timesteps: Vec<f64>,
    step_ratio: usize,
    final_alpha_cumprod: f64,
}

impl Ddim {
    pub fn new(common: Common, config: &SchedulerConfig, steps: usize) -> Result<Self> {
        common.check_steps(steps)?;
        let t = common.train_steps;
        let timesteps: Vec<f64> = match common.spacing {
            Spacing::Linspace => linspace(0.0, (t - 1) as f64, steps).into_iter().rev().map(round_even).collect(),
            Spacing::Leading => {
                let ratio = t / steps;
                (0..steps).rev().map(|i| (i * ratio + common.steps_offset) as f64).collect()
            }
            Spacing::Trailing => {
                let ratio = t as f64 / steps as f64;
                arange_desc(t as f64, ratio).into_iter().map(|v| round_even(v) - 1.0).collect()
            }
        };
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) { 1.0 } else { common.alphas_cumprod[0] };
        Ok(Self { step_ratio: t / steps, common, timesteps, final_alpha_cumprod })
    }
}

/// numpy's `arange(start, 0, -step)`.
pub(super) fn arange_desc(start: f64, step: f64) -> Vec<f64> {
    let n = (start / step).ceil() as usize;
    (0..n).map(|i| start - step * i as f64).filter(|v| *v > 0.0).collect()
}

impl Scheduler for Ddim {
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
        ddpm_noising(&self.common.alphas_cumprod, self.timesteps[i])
    }

    fn step(&mut self, i: usize) -> StepPlan {
        let t = self.timesteps[i] as i64;
        let prev_t = t - self.step_ratio as i64;
        let acp = &self.common.alphas_cumprod;
        let a_t = acp[(t as usize).min(acp.len() - 1)];
        let a_prev = if prev_t >= 0 { acp[(prev_t as usize).min(acp.len() - 1)] } else { self.final_alpha_cumprod };
        let (sa, sb) = (a_t.sqrt(), (1.0 - a_t).sqrt());
        // pred_epsilon in terms of sample and model output, then
        // prev = sqrt(a_prev) * x0 + sqrt(1 - a_prev) * pred_epsilon.
        let x0 = x0_terms(self.common.prediction, sa, sb);
        let eps = match self.common.prediction {
            super::Prediction::Epsilon => vec![(Term::ModelOutput, 1.0)],
            super::Prediction::VPrediction => vec![(Term::ModelOutput, sa), (Term::Sample, sb)],
            super::Prediction::Sample => vec![(Term::Sample, 1.0 / sb), (Term::X0, -sa / sb)],
        };
        let mut prev = vec![(Term::X0, a_prev.sqrt())];
        prev.extend(eps.into_iter().map(|(term, c)| (term, c * (1.0 - a_prev).sqrt())));
        StepPlan { x0, prev }
    }
}
