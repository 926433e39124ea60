//! RGBA images: the generator's output (PNG with the settings embedded), and init images read from PNG and
//! resized for img2img.

use crate::error::{Error, Result};

/// An RGBA image, 8 bits per channel, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    pub rgba: Vec<u8>,
}

/// The largest init image side read (a larger PNG is most likely a mistake, and its pixels would not fit).
const MAX_SIDE: u32 = 16384;

impl Image {
    /// An RGBA PNG with `parameters` (the generation settings, A1111's layout) in a text chunk named
    /// "parameters": tEXt when it is Latin-1, iTXt (UTF-8) otherwise.
    pub fn to_png(&self, parameters: &str) -> Result<Vec<u8>> {
        let png_err = |e: png::EncodingError| Error::Invalid(format!("encoding the PNG: {e}"));
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, self.width as u32, self.height as u32);
        enc.set_color(png::ColorType::Rgba);
        enc.set_depth(png::BitDepth::Eight);
        if parameters.chars().all(|c| (c as u32) < 256) {
            enc.add_text_chunk("parameters".into(), parameters.into()).map_err(png_err)?;
        } else {
            enc.add_itxt_chunk("parameters".into(), parameters.into()).map_err(png_err)?;
        }
        let mut writer = enc.write_header().map_err(png_err)?;
        writer.write_image_data(&self.rgba).map_err(png_err)?;
        writer.finish().map_err(png_err)?;
        Ok(out)
    }

    /// Reads a PNG of any colour type and bit depth (grey, palette, RGB, with or without alpha, 16-bit)
    /// into RGBA 8-bit.
    pub fn from_png(bytes: &[u8]) -> Result<Self> {
        let bad = |e: png::DecodingError| Error::Invalid(format!("not a readable PNG: {e}"));
        let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        decoder.set_transformations(png::Transformations::normalize_to_color8());
        let mut reader = decoder.read_info().map_err(bad)?;
        let (w, h) = (reader.info().width, reader.info().height);
        if w > MAX_SIDE || h > MAX_SIDE {
            return Err(Error::Invalid(format!("a {w}x{h} PNG is larger than {MAX_SIDE} pixels on a side")));
        }
        let size = reader.output_buffer_size().ok_or_else(|| Error::Invalid("the PNG is too large".into()))?;
        let mut buf = vec![0u8; size];
        let frame = reader.next_frame(&mut buf).map_err(bad)?;
        let (width, height) = (frame.width as usize, frame.height as usize);
        let pixels = width * height;
        let rgba = match frame.color_type {
            png::ColorType::Rgba => buf[..pixels * 4].to_vec(),
            png::ColorType::Rgb => buf[..pixels * 3].chunks_exact(3).flat_map(|p| [p[0], p[1], p[2], 255]).collect(),
            png::ColorType::GrayscaleAlpha => {
                buf[..pixels * 2].chunks_exact(2).flat_map(|p| [p[0], p[0], p[0], p[1]]).collect()
            }
            png::ColorType::Grayscale => buf[..pixels].iter().flat_map(|&g| [g, g, g, 255]).collect(),
            png::ColorType::Indexed => {
                return Err(Error::Invalid("the PNG's palette was not expanded".into()));
            }
        };
        Ok(Self { width, height, rgba })
    }

    /// The image resampled to `width` x `height` with a Lanczos-3 filter, widened when shrinking so that
    /// it averages rather than aliases (as PIL's `resize(LANCZOS)`, which diffusers' image processor uses).
    /// Alpha is carried along; the pipeline reads RGB only.
    pub fn resized(&self, width: usize, height: usize) -> Image {
        if (width, height) == (self.width, self.height) {
            return self.clone();
        }
        let planes: Vec<f32> = self.rgba.iter().map(|&v| v as f32).collect();
        // Rows first (width changes), then columns.
        let horizontal = resample(&planes, self.width, self.height, width, 4);
        let both = resample_columns(&horizontal, width, self.height, height);
        Image { width, height, rgba: both.iter().map(|v| v.round().clamp(0.0, 255.0) as u8).collect() }
    }

    /// The RGB channels as (3, h, w) planes in [-1, 1]: `2 * v / 255 - 1`, as diffusers' image processor
    /// normalizes.
    pub fn to_planes(&self) -> Vec<f32> {
        let n = self.width * self.height;
        let mut out = vec![0f32; 3 * n];
        for i in 0..n {
            for c in 0..3 {
                out[c * n + i] = self.rgba[i * 4 + c] as f32 / 255.0 * 2.0 - 1.0;
            }
        }
        out
    }
}

fn lanczos3(x: f32) -> f32 {
    let x = x.abs();
    if x < 1e-6 {
        return 1.0;
    }
    if x >= 3.0 {
        return 0.0;
    }
    let px = std::f32::consts::PI * x;
    3.0 * px.sin() * (px / 3.0).sin() / (px * px)
}

/// For each output position along an axis of `from` samples resized to `to`: the first input index and
/// the normalized filter weights (PIL's `precompute_coeffs`).
fn coefficients(from: usize, to: usize) -> Vec<(usize, Vec<f32>)> {
    let scale = from as f32 / to as f32;
    let filter_scale = scale.max(1.0);
    let support = 3.0 * filter_scale;
    (0..to)
        .map(|o| {
            let center = (o as f32 + 0.5) * scale;
            let lo = (center - support + 0.5).floor().max(0.0) as usize;
            let hi = ((center + support + 0.5).floor() as usize).min(from);
            let mut w: Vec<f32> = (lo..hi).map(|i| lanczos3((i as f32 - center + 0.5) / filter_scale)).collect();
            let sum: f32 = w.iter().sum();
            if sum != 0.0 {
                w.iter_mut().for_each(|v| *v /= sum);
            }
            (lo, w)
        })
        .collect()
}

/// Resamples each row of an interleaved (h, w, channels) image to `to` columns.
fn resample(data: &[f32], w: usize, h: usize, to: usize, channels: usize) -> Vec<f32> {
    let coeffs = coefficients(w, to);
    let mut out = vec![0f32; h * to * channels];
    for y in 0..h {
        for (x, (lo, weights)) in coeffs.iter().enumerate() {
            for c in 0..channels {
                let mut acc = 0f32;
                for (k, wt) in weights.iter().enumerate() {
                    acc += wt * data[(y * w + lo + k) * channels + c];
                }
                out[(y * to + x) * channels + c] = acc;
            }
        }
    }
    out
}

/// Resamples each column of an interleaved (h, w, 4) image to `to` rows.
fn resample_columns(data: &[f32], w: usize, h: usize, to: usize) -> Vec<f32> {
    let coeffs = coefficients(h, to);
    let row = w * 4;
    let mut out = vec![0f32; to * row];
    for (y, (lo, weights)) in coeffs.iter().enumerate() {
        for (k, wt) in weights.iter().enumerate() {
            let src = &data[(lo + k) * row..][..row];
            for (o, s) in out[y * row..][..row].iter_mut().zip(src) {
                *o += wt * s;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::Image;

    fn checker(w: usize, h: usize) -> Image {
        let rgba = (0..w * h)
            .flat_map(|i| {
                let (x, y) = (i % w, i / w);
                let v = if (x / 4 + y / 4) % 2 == 0 { 200 } else { 40 };
                [v, (x * 255 / w) as u8, (y * 255 / h) as u8, 255]
            })
            .collect();
        Image { width: w, height: h, rgba }
    }

    #[test]
    fn png_round_trips_and_other_colour_types_read_as_rgba() {
        let img = checker(24, 16);
        assert_eq!(Image::from_png(&img.to_png("x").unwrap()).unwrap(), img);
        // An RGB PNG reads with opaque alpha.
        let mut rgb = Vec::new();
        let mut enc = png::Encoder::new(&mut rgb, 2, 1);
        enc.set_color(png::ColorType::Rgb);
        enc.write_header().unwrap().write_image_data(&[1, 2, 3, 4, 5, 6]).unwrap();
        assert_eq!(Image::from_png(&rgb).unwrap().rgba, vec![1, 2, 3, 255, 4, 5, 6, 255]);
        let e = Image::from_png(b"\x89PNG\r\n\x1a\nnot really").unwrap_err().to_string();
        assert!(e.contains("not a readable PNG"), "{e}");
    }

    #[test]
    fn resizing_keeps_flat_colours_and_averages_when_shrinking() {
        let flat = Image { width: 10, height: 6, rgba: [30u8, 60, 90, 255].repeat(60) };
        let up = flat.resized(23, 17);
        assert!(up.rgba.chunks(4).all(|p| p == [30, 60, 90, 255]), "{:?}", &up.rgba[..8]);
        // Halving a 1-pixel checkerboard gives its mean, not one of its colours.
        let fine = Image {
            width: 16,
            height: 16,
            rgba: (0..256).flat_map(|i| if (i % 16 + i / 16) % 2 == 0 { [255u8; 4] } else { [0, 0, 0, 255] }).collect(),
        };
        let half = fine.resized(8, 8);
        assert!(half.rgba.chunks(4).all(|p| (100..=155).contains(&p[0])), "{:?}", &half.rgba[..16]);
        assert_eq!(checker(8, 8).resized(8, 8), checker(8, 8));
    }
}
