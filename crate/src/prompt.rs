//! Prompt weighting in AUTOMATIC1111's syntax: `(words)` multiplies their attention by 1.1, `((words))` by
//! 1.21, `(words:1.5)` by 1.5, `[words]` divides by 1.1, `\(` `\)` `\[` `\]` `\\` are literal; unbalanced
//! brackets close at the end. A port of A1111's `parse_prompt_attention` (modules/prompt_parser.py), written
//! as a scanner instead of its regular expression. The weights scale the text encoder's output per token,
//! with its mean restored ([`apply_weights`]), as A1111's "Original" emphasis does.

/// The prompt as (text, weight) runs, neighbours of equal weight merged; `[("", 1.0)]` for an empty prompt.
pub fn parse_weighted(text: &str) -> Vec<(String, f32)> {
    let mut res: Vec<(String, f32)> = Vec::new();
    let (mut round, mut square): (Vec<usize>, Vec<usize>) = (Vec::new(), Vec::new());
    let multiply = |res: &mut Vec<(String, f32)>, from: usize, k: f32| {
        for r in &mut res[from..] {
            r.1 *= k;
        }
    };
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\\' if i + 1 < chars.len() && "()[]\\".contains(chars[i + 1]) => {
                res.push((chars[i + 1].to_string(), 1.0));
                i += 2;
                continue;
            }
            '(' => round.push(res.len()),
            '[' => square.push(res.len()),
            ':' => {
                // ":" then a number then ")" closes the innermost round bracket with that weight.
                if let (Some((weight, end)), false) = (weight_close(&chars, i), round.is_empty()) {
                    let from = round.pop().expect("checked");
                    multiply(&mut res, from, weight);
                    i = end;
                    continue;
                }
                res.push((":".into(), 1.0));
            }
            ')' if !round.is_empty() => {
                let from = round.pop().expect("checked");
                multiply(&mut res, from, 1.1);
            }
            ']' if !square.is_empty() => {
                let from = square.pop().expect("checked");
                multiply(&mut res, from, 1.0 / 1.1);
            }
            _ => {
                // A run of ordinary characters (a lone bracket that closes nothing is ordinary too).
                let start = i;
                i += 1;
                while i < chars.len() && !"\\()[]:".contains(chars[i]) {
                    i += 1;
                }
                res.push((chars[start..i].iter().collect(), 1.0));
                continue;
            }
        }
        i += 1;
    }
    for from in round {
        multiply(&mut res, from, 1.1);
    }
    for from in square {
        multiply(&mut res, from, 1.0 / 1.1);
    }
    if res.is_empty() {
        return vec![(String::new(), 1.0)];
    }
    let mut merged: Vec<(String, f32)> = Vec::new();
    for (t, w) in res {
        match merged.last_mut() {
            Some(last) if last.1 == w => last.0.push_str(&t),
            _ => merged.push((t, w)),
        }
    }
    merged
}

/// At `chars[i] == ':'`: the weight and the index after the ")" when `:\s*[+-]?[.\d]+\s*\)` follows.
fn weight_close(chars: &[char], i: usize) -> Option<(f32, usize)> {
    let mut j = i + 1;
    while j < chars.len() && chars[j].is_whitespace() {
        j += 1;
    }
    let start = j;
    if j < chars.len() && (chars[j] == '+' || chars[j] == '-') {
        j += 1;
    }
    while j < chars.len() && (chars[j].is_ascii_digit() || chars[j] == '.') {
        j += 1;
    }
    let number: String = chars[start..j].iter().collect();
    while j < chars.len() && chars[j].is_whitespace() {
        j += 1;
    }
    if j < chars.len() && chars[j] == ')' { number.parse::<f32>().ok().map(|w| (w, j + 1)) } else { None }
}

/// Scales each token's embedding by its weight and restores the mean, per prompt: `z` holds `prompts`
/// embeddings of `tokens` x `dim` values, `weights` one weight per token of each prompt.
pub fn apply_weights(z: &mut [f32], weights: &[f32], tokens: usize, dim: usize) {
    for (item, w) in z.chunks_mut(tokens * dim).zip(weights.chunks(tokens)) {
        let before: f64 = item.iter().map(|v| *v as f64).sum();
        for (row, wt) in item.chunks_mut(dim).zip(w) {
            row.iter_mut().for_each(|v| *v *= wt);
        }
        let after: f64 = item.iter().map(|v| *v as f64).sum();
        if after != 0.0 {
            let k = (before / after) as f32;
            item.iter_mut().for_each(|v| *v *= k);
        }
    }
}

/// A1111's LoRA tags, `<lora:NAME:WEIGHT>` or `<lora:NAME>` (weight 1; `<lyco:...>` too): the prompt without
/// them, and each (name, weight) in order. A tag whose weight is not a number stays in the text.
pub fn lora_tags(text: &str) -> (String, Vec<(String, f32)>) {
    let (mut out, mut tags) = (String::with_capacity(text.len()), Vec::new());
    let mut rest = text;
    while let Some(start) = rest.find('<') {
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        let parsed = tail.find('>').and_then(|end| {
            let inner = &tail[1..end];
            let (kind, args) = inner.split_once(':')?;
            if !matches!(kind, "lora" | "lyco") {
                return None;
            }
            let mut parts = args.split(':');
            let name = parts.next()?.trim();
            let weight = match parts.next() {
                Some(w) => w.trim().parse::<f32>().ok().filter(|w| w.is_finite())?,
                None => 1.0,
            };
            (!name.is_empty()).then(|| ((name.to_string(), weight), end + 1))
        });
        match parsed {
            Some((tag, len)) => {
                tags.push(tag);
                rest = &tail[len..];
            }
            None => {
                out.push('<');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    (out, tags)
}

#[cfg(test)]
mod tests {
    use super::{lora_tags, parse_weighted};

    fn p(text: &str) -> Vec<(String, f32)> {
        parse_weighted(text).into_iter().map(|(t, w)| (t, (w * 10000.0).round() / 10000.0)).collect()
    }

    fn v(items: &[(&str, f32)]) -> Vec<(String, f32)> {
        items.iter().map(|(t, w)| (t.to_string(), *w)).collect()
    }

    /// The examples of A1111's parse_prompt_attention docstring.
    #[test]
    fn parses_as_automatic1111_does() {
        assert_eq!(p("normal text"), v(&[("normal text", 1.0)]));
        assert_eq!(p("an (important) word"), v(&[("an ", 1.0), ("important", 1.1), (" word", 1.0)]));
        assert_eq!(p("(unbalanced"), v(&[("unbalanced", 1.1)]));
        assert_eq!(p("\\(literal\\]"), v(&[("(literal]", 1.0)]));
        assert_eq!(p("(unnecessary)(parens)"), v(&[("unnecessaryparens", 1.1)]));
        assert_eq!(
            p("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."),
            v(&[
                ("a ", 1.0),
                ("house", 1.5730),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641),
                (".", 1.1),
            ])
        );
        assert_eq!(p(""), v(&[("", 1.0)]));
        assert_eq!(p("[word]"), v(&[("word", 0.9091)]));
        assert_eq!(p("time: 5pm"), v(&[("time: 5pm", 1.0)]));
        assert_eq!(p("a ) b ]"), v(&[("a ) b ]", 1.0)]));
    }

    #[test]
    fn lora_tags_are_taken_out_of_the_prompt() {
        let (text, tags) = lora_tags("a <lora:pinkish:0.8>pink circle<lora:ring>, <lyco:x: -1.5 > <b>");
        assert_eq!(text, "a pink circle,  <b>");
        assert_eq!(tags, vec![("pinkish".into(), 0.8), ("ring".into(), 1.0), ("x".into(), -1.5)]);
        let (text, tags) = lora_tags("<lora:bad:much> <tiny-cat> 2 < 3 <lora:");
        assert_eq!(text, "<lora:bad:much> <tiny-cat> 2 < 3 <lora:");
        assert!(tags.is_empty());
    }

    #[test]
    fn weights_scale_tokens_and_keep_the_mean() {
        let mut z = vec![1.0, 2.0, 3.0, 4.0, 1.0, 1.0, 1.0, 1.0];
        let before: f32 = z[..4].iter().sum();
        super::apply_weights(&mut z, &[2.0, 1.0, 1.0, 1.0], 2, 2);
        assert!((z[..4].iter().sum::<f32>() - before).abs() < 1e-5);
        assert!(z[0] / z[2] > 0.66 && z[0] / z[2] < 0.67, "the first token doubled relative to the second");
        assert_eq!(&z[4..], &[1.0; 4], "a prompt of weight 1 is unchanged");
    }
}
