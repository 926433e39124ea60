//! Images made of images: interpolation strips and animations, and labelled grids over one or two settings
//! (A1111's X/Y plot), shared by the CLI's `interpolate` and `grid` and the page's walks and sweeps.

use crate::image::Image;
use crate::pipeline::Request;
use crate::{Error, Result};

/// One axis of a grid: the setting and its values (`KEY=V1,V2,...`).
#[derive(Clone, Debug)]
pub struct Axis {
    pub key: String,
    pub values: Vec<String>,
}

impl Axis {
    /// The settings an axis can vary (`prompt`: search for the first value, replace it by each).
    pub const KEYS: [&'static str; 7] =
        ["seed", "guidance", "steps", "scheduler", "strength", "subseed-strength", "prompt"];

    /// Parses `KEY=V1,V2,...` (1 to 64 values).
    pub fn parse(arg: &str) -> Result<Axis> {
        let (key, values) =
            arg.split_once('=').ok_or_else(|| Error::Invalid(format!("a grid axis is KEY=V1,V2,..., not {arg:?}")))?;
        let key = key.trim();
        if !Self::KEYS.contains(&key) {
            return Err(Error::Invalid(format!("unknown grid axis {key:?}: use one of {}", Self::KEYS.join(", "))));
        }
        let values: Vec<String> = values.split(',').map(|v| v.trim().to_string()).collect();
        if values.iter().any(String::is_empty) || values.len() > 64 {
            return Err(Error::Invalid(format!("grid axis {key}: 1 to 64 values separated by commas, got {values:?}")));
        }
        Ok(Axis { key: key.into(), values })
    }

    /// `req` with this axis at value `i`.
    pub fn apply(&self, req: &Request, i: usize) -> Result<Request> {
        let v = &self.values[i];
        let bad = |e: &dyn std::fmt::Display| Error::Invalid(format!("grid axis {}: {v:?}: {e}", self.key));
        let mut r = req.clone();
        match self.key.as_str() {
            "seed" => r.seed = v.parse().map_err(|e| bad(&e))?,
            "guidance" => r.guidance = v.parse().map_err(|e| bad(&e))?,
            "steps" => r.steps = v.parse().map_err(|e| bad(&e))?,
            "scheduler" => r.scheduler = Some(v.parse().map_err(|e| bad(&e))?),
            "strength" => r.strength = v.parse().map_err(|e| bad(&e))?,
            "subseed-strength" => r.subseed_strength = v.parse().map_err(|e| bad(&e))?,
            "prompt" => {
                let search = &self.values[0];
                if !req.prompt.contains(search.as_str()) {
                    return Err(Error::Invalid(format!(
                        "grid axis prompt: {search:?} is not in the prompt {:?}",
                        req.prompt
                    )));
                }
                r.prompt = req.prompt.replacen(search.as_str(), v, 1);
            }
            _ => unreachable!("checked in parse"),
        }
        Ok(r)
    }

    /// "key=value", or only the value when that does not fit `chars` characters.
    pub fn label(&self, i: usize, chars: usize) -> String {
        let full = format!("{}={}", self.key, self.values[i]);
        if full.len() <= chars { full } else { self.values[i].clone() }
    }

    /// "key: v1, v2, ..." (for the PNG's parameters).
    pub fn describe(&self) -> String {
        format!("{}: {}", self.key, self.values.join(", "))
    }
}

/// Every cell's request of a grid, row by row (`y`'s values) and then column by column (`x`'s), so that a
/// bad value fails before any work.
pub fn grid_requests(base: &Request, x: &Axis, y: Option<&Axis>) -> Result<Vec<Request>> {
    let rows = y.map_or(1, |a| a.values.len());
    let mut cells = Vec::with_capacity(rows * x.values.len());
    for row in 0..rows {
        let r = match y {
            Some(a) => a.apply(base, row)?,
            None => base.clone(),
        };
        for col in 0..x.values.len() {
            cells.push(x.apply(&r, col)?);
        }
    }
    Ok(cells)
}

/// The grid image: `cells` (all one size, in [`grid_requests`]' order) under a band of `x` labels, beside a
/// column of `y` labels, on white.
pub fn grid_image(cells: &[Image], x: &Axis, y: Option<&Axis>) -> Result<Image> {
    let rows = y.map_or(1, |a| a.values.len());
    let (w, h) = same_size(cells)?;
    if cells.len() != rows * x.values.len() {
        return Err(Error::Invalid(format!(
            "a {}x{rows} grid needs {} cells, got {}",
            x.values.len(),
            rows * x.values.len(),
            cells.len()
        )));
    }
    let scale = (w / 128).clamp(1, 4);
    let band = 8 * scale + 4;
    let left = y.map_or(0, |a| (0..rows).map(|i| a.label(i, 24).len()).max().unwrap_or(0) * 8 * scale + 6);
    let (gw, gh) = (left + w * x.values.len(), band + h * rows);
    let mut grid = Image { width: gw, height: gh, rgba: [255u8, 255, 255, 255].repeat(gw * gh) };
    for (n, cell) in cells.iter().enumerate() {
        let (row, col) = (n / x.values.len(), n % x.values.len());
        paste(&mut grid, cell, left + col * w, band + row * h);
    }
    for col in 0..x.values.len() {
        draw_text(&mut grid, left + col * w + 2, 2, &x.label(col, (w - 2) / (8 * scale)), scale, w - 2);
    }
    if let Some(a) = y {
        for row in 0..rows {
            draw_text(&mut grid, 2, band + row * h + 2, &a.label(row, 24), scale, left);
        }
    }
    Ok(grid)
}

/// The frames side by side, left to right.
pub fn strip(frames: &[Image]) -> Result<Image> {
    let (w, h) = same_size(frames)?;
    let mut strip = Image { width: w * frames.len(), height: h, rgba: vec![0; w * frames.len() * h * 4] };
    for (f, frame) in frames.iter().enumerate() {
        paste(&mut strip, frame, f * w, 0);
    }
    Ok(strip)
}

/// The frames forth and back (the ends shown once) as a looping GIF, `frame_ms` per frame.
pub fn gif(frames: &[Image], frame_ms: u16) -> Result<Vec<u8>> {
    let (w, h) = same_size(frames)?;
    if w > u16::MAX as usize || h > u16::MAX as usize {
        return Err(Error::Invalid(format!("a {w}x{h} frame is too large for a GIF")));
    }
    let fail = |e: gif::EncodingError| Error::Invalid(format!("encoding the GIF: {e}"));
    let mut bytes = Vec::new();
    {
        let mut enc = gif::Encoder::new(&mut bytes, w as u16, h as u16, &[]).map_err(fail)?;
        enc.set_repeat(gif::Repeat::Infinite).map_err(fail)?;
        let order = (0..frames.len()).chain((1..frames.len().saturating_sub(1)).rev());
        for f in order {
            let mut rgba = frames[f].rgba.clone();
            let mut frame = gif::Frame::from_rgba_speed(w as u16, h as u16, &mut rgba, 10);
            frame.delay = frame_ms.div_ceil(10);
            enc.write_frame(&frame).map_err(fail)?;
        }
    }
    Ok(bytes)
}

/// The one size of `images` (at least one).
fn same_size(images: &[Image]) -> Result<(usize, usize)> {
    let first = images.first().ok_or_else(|| Error::Invalid("no images to put together".into()))?;
    let (w, h) = (first.width, first.height);
    if let Some(other) = images.iter().find(|i| (i.width, i.height) != (w, h)) {
        return Err(Error::Invalid(format!(
            "images of different sizes ({w}x{h} and {}x{}) cannot be put together",
            other.width, other.height
        )));
    }
    Ok((w, h))
}

/// Copies `src` into `dst` with its top left corner at (x, y).
fn paste(dst: &mut Image, src: &Image, x: usize, y: usize) {
    for row in 0..src.height {
        let d = ((y + row) * dst.width + x) * 4;
        dst.rgba[d..d + src.width * 4].copy_from_slice(&src.rgba[row * src.width * 4..(row + 1) * src.width * 4]);
    }
}

/// Black 8x8 text (font8x8's public-domain glyphs, `scale` times larger) at (x, y), cut at `max_width`
/// pixels; characters outside Basic Latin draw as '?'.
fn draw_text(img: &mut Image, x: usize, y: usize, text: &str, scale: usize, max_width: usize) {
    use font8x8::UnicodeFonts;
    for (i, ch) in text.chars().enumerate() {
        let x0 = x + i * 8 * scale;
        if (i + 1) * 8 * scale > max_width {
            break;
        }
        let glyph = font8x8::BASIC_FONTS.get(ch).or_else(|| font8x8::BASIC_FONTS.get('?')).unwrap_or([0; 8]);
        for (gy, bits) in glyph.iter().enumerate() {
            for gx in 0..8 {
                if bits & (1 << gx) == 0 {
                    continue;
                }
                for sy in 0..scale {
                    for sx in 0..scale {
                        let (px, py) = (x0 + gx * scale + sx, y + gy * scale + sy);
                        if px < img.width && py < img.height {
                            img.rgba[(py * img.width + px) * 4..][..3].copy_from_slice(&[0, 0, 0]);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(w: usize, h: usize, v: u8) -> Image {
        Image { width: w, height: h, rgba: [v, v, v, 255].repeat(w * h) }
    }

    #[test]
    fn grid_requests_vary_rows_then_columns_and_refuse_bad_values() {
        let base = Request { prompt: "a red square".into(), ..Default::default() };
        let x = Axis::parse("guidance=3,5").unwrap();
        let y = Axis::parse("prompt=red,blue").unwrap();
        let cells = grid_requests(&base, &x, Some(&y)).unwrap();
        let got: Vec<(f32, &str)> = cells.iter().map(|r| (r.guidance, r.prompt.as_str())).collect();
        assert_eq!(got, [(3.0, "a red square"), (5.0, "a red square"), (3.0, "a blue square"), (5.0, "a blue square")]);
        assert!(grid_requests(&base, &Axis::parse("steps=4,x").unwrap(), None).is_err());
        assert!(Axis::parse("colour=1,2").is_err());
        assert!(grid_requests(&base, &Axis::parse("prompt=green,blue").unwrap(), None).is_err());
    }

    #[test]
    fn strips_grids_and_gifs_put_frames_in_place() {
        let frames = [flat(4, 2, 10), flat(4, 2, 200)];
        let s = strip(&frames).unwrap();
        assert_eq!((s.width, s.height), (8, 2));
        assert_eq!((s.rgba[0], s.rgba[4 * 4]), (10, 200));
        let x = Axis::parse("seed=1,2").unwrap();
        let g = grid_image(&[flat(16, 16, 10), flat(16, 16, 200)], &x, None).unwrap();
        assert_eq!((g.width, g.height), (32, 16 + 12));
        assert_eq!(g.rgba[(20 * 32 + 20) * 4], 200, "the second cell, right of the first, under the labels");
        assert!(g.rgba[..32 * 12 * 4].chunks(4).any(|p| p[0] == 0), "labels drawn in the band");
        assert!(grid_image(&frames[..1], &x, None).is_err(), "one cell for two columns");
        assert!(strip(&[flat(4, 2, 0), flat(2, 4, 0)]).is_err(), "different sizes");
        let bytes = gif(&frames, 100).unwrap();
        assert_eq!(&bytes[..6], b"GIF89a");
    }
}
