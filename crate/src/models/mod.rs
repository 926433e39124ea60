//! The networks of a latent diffusion model, by diffusers' module names: the CLIP text encoder, the
//! conditional UNet, the KL autoencoder and the tiny autoencoder (TAESD). Config structs are read from
//! diffusers' / transformers' `config.json`; weights come by their checkpoint names. Models call `ops` only.

pub mod attention;
pub mod clip;
pub mod nn;
pub mod resnet;
pub mod taesd;
pub mod unet_2d;
pub mod unet_2d_blocks;
pub mod vae;

use serde::Deserialize;

use crate::error::{Error, Result};

/// A config value diffusers accepts either as one number for every block or as a list per block.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    /// The value for each of `n` blocks.
    pub fn expand(&self, n: usize, what: &str) -> Result<Vec<usize>> {
        match self {
            PerBlock::One(v) => Ok(vec![*v; n]),
            PerBlock::Each(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Each(v) => Err(Error::Invalid(format!("config: {what} has {} entries for {n} blocks", v.len()))),
        }
    }
}

/// Parses a `config.json`, naming the file in errors.
pub fn parse_config<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| Error::Invalid(format!("{what} config.json: {e}")))
}
