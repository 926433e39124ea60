//! Latent Consistency Model multistep sampling (Luo et al. 2023), as diffusers' `LCMScheduler`.

use super::{Common, Scheduler, SchedulerConfig, StepPlan, Term, ddpm_noising, x0_terms};
use crate::error::{Error, Result};

pub struct Lcm {
    common: Common,
    timesteps: Vec<f64>,
    timestep_scaling: f64,
}

impl Lcm {
    pub fn new(common: Common, config: &SchedulerConfig, steps: usize) -> Result<Self> {
        Self::with_strength(common, config, steps, 1.0)
    }

    /// img2img with a latent consistency model (diffusers' `LCMScheduler.set_timesteps(strength=...)`): the
    /// distillation schedule keeps its `original_inference_steps * strength` least noisy timesteps, and all
    /// `steps` are taken from those.
    pub fn with_strength(common: Common, config: &SchedulerConfig, steps: usize, strength: f64) -> Result<Self> {
        common.check_steps(steps)?;
        let original = config.original_inference_steps.unwrap_or(50);
        let t = common.train_steps;
        if original == 0 || original > t || steps > original {
            return Err(Error::Invalid(format!(
                "LCM: {steps} steps need 1 <= steps <= original_inference_steps ({original}) <= {t}"
            )));
        }
        // int(original * strength) in Python, with the strength as written (an f32's last bits would turn
        // 50 x 0.7 into 34).
        let kept = (original as f64 * strength + 1e-6).floor() as usize;
        if kept < steps {
            return Err(Error::Invalid(format!(
                "LCM img2img: strength {strength} keeps {kept} of the model's {original} distillation timesteps, fewer \
                 than the {steps} steps asked for: lower the steps or raise the strength"
            )));
        }
        // The distillation schedule (k, 2k, ... minus one), reversed, sampled at floor(linspace(0, len, steps)).
        let k = t / original;
        let origin: Vec<usize> = (1..=kept).rev().map(|i| i * k - 1).collect();
        let timesteps = (0..steps).map(|i| origin[i * kept / steps] as f64).collect();
        // (set_alpha_to_one would only matter for a previous timestep below 0, which LCM never has.)
        let timestep_scaling = config.timestep_scaling.unwrap_or(10.0);
        Ok(Self { common, timesteps, timestep_scaling })
    }
}

impl Scheduler for Lcm {
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
        let acp = &self.common.alphas_cumprod;
        let t = self.timesteps[i] as usize;
        let last = i + 1 == self.timesteps.len();
        let a_t = acp[t.min(acp.len() - 1)];
        let a_prev = if last { a_t } else { acp[self.timesteps[i + 1] as usize] };
        // Boundary-condition scalings: the plan's x0 is LCM's denoised latent, c_out * x0 + c_skip * sample,
        // which the pipeline decodes after the last step.
        let scaled = t as f64 * self.timestep_scaling;
        let sigma_data2 = 0.25;
        let c_skip = sigma_data2 / (scaled * scaled + sigma_data2);
        let c_out = scaled / (scaled * scaled + sigma_data2).sqrt();
        let x0 = x0_terms(self.common.prediction, a_t.sqrt(), (1.0 - a_t).sqrt());
        let x0 = x0.into_iter().map(|(term, c)| (term, c * c_out)).chain([(Term::Sample, c_skip)]).collect();
        let prev = if last {
            vec![(Term::X0, 1.0)]
        } else {
            vec![(Term::X0, a_prev.sqrt()), (Term::Noise, (1.0 - a_prev).sqrt())]
        };
        StepPlan { x0, prev }
    }
}
