//! What the `demo` model was trained to show, and the check that it shows it: the prompts
//! (`a {color} {shape} moving {direction}`, as `train/clips.py` captions its clips) and the track
//! of the prompt's colored shape through a generated video.
//!
//! The training clips keep every background pixel more than [`BACKGROUND_MARGIN`] (RGB distance,
//! 0–255) from every shape color, so a pixel's color says whether it belongs to the shape: a
//! pixel is the shape's when the shape's color is the palette color nearest to it and nearer than
//! [`MATCH_DISTANCE`].

use tessera_kernels::Tensor;

/// The shape colors and their RGB values (`COLORS` in `train/clips.py`).
pub const COLORS: [(&str, [u8; 3]); 5] =
    [("red", [220, 40, 40]), ("green", [40, 200, 60]), ("blue", [50, 90, 235]), ("yellow", [235, 215, 40]), ("white", [245, 245, 245])];
/// The shapes.
pub const SHAPES: [&str; 3] = ["ball", "square", "triangle"];
/// The directions and their unit steps (x right, y down).
pub const DIRECTIONS: [(&str, [f64; 2]); 4] = [("left", [-1.0, 0.0]), ("right", [1.0, 0.0]), ("up", [0.0, -1.0]), ("down", [0.0, 1.0])];
/// The least RGB distance from a training background pixel to a shape color.
pub const BACKGROUND_MARGIN: f64 = 100.0;
/// A pixel within this distance of a shape color (and nearest to it) is the shape's: 60 % of the
/// margin, so that no background pixel of a training clip qualifies.
pub const MATCH_DISTANCE: f64 = 0.6 * BACKGROUND_MARGIN;
/// Fewest matching pixels for a frame to show the shape at all.
pub const MIN_PIXELS: usize = 6;
/// How far the shape must travel, first frame to last, in the prompt's direction, as a share of
/// the frame's extent along it (the bar; the training clips travel 40–60 %).
pub const MIN_TRAVEL: f64 = 0.25;

/// The prompt `tessera generate` runs a built-in model with when it is given none: one the demo
/// model was trained on (and what README's first command asks for).
pub const EXAMPLE_PROMPT: &str = "a red ball moving right";

/// One demo prompt.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DemoPrompt {
    /// Color name.
    pub color: &'static str,
    /// Its RGB value.
    pub rgb: [u8; 3],
    /// Shape name.
    pub shape: &'static str,
    /// Direction name.
    pub direction: &'static str,
    /// Unit step of the direction (x right, y down).
    pub step: [f64; 2],
}

impl DemoPrompt {
    /// The caption the model was trained on.
    pub fn text(&self) -> String {
        format!("a {} {} moving {}", self.color, self.shape, self.direction)
    }
}

/// The 60 prompts, color by shape by direction (the order of `all_prompts` in `train/clips.py`).
pub fn prompts() -> Vec<DemoPrompt> {
    let mut out = Vec::with_capacity(60);
    for (color, rgb) in COLORS {
        for shape in SHAPES {
            for (direction, step) in DIRECTIONS {
                out.push(DemoPrompt { color, rgb, shape, direction, step });
            }
        }
    }
    out
}

/// Where the shape of color `rgb` is in each frame of `video` (`[1, 3, F, H, W]` in [0, 1]):
/// the centroid `(x, y)` in pixels of its matching pixels, or `None` where fewer than
/// [`MIN_PIXELS`] match.
pub fn track(video: &Tensor, rgb: [u8; 3]) -> Vec<Option<[f64; 2]>> {
    let &[_, _, frames, h, w] = video.shape() else { return Vec::new() };
    let data = video.data();
    let plane = h * w;
    let palette: Vec<[f64; 3]> = COLORS.iter().map(|(_, c)| c.map(f64::from)).collect();
    let target = rgb.map(f64::from);
    let dist = |p: [f64; 3], c: [f64; 3]| ((p[0] - c[0]).powi(2) + (p[1] - c[1]).powi(2) + (p[2] - c[2]).powi(2)).sqrt();
    (0..frames)
        .map(|f| {
            let (mut n, mut sx, mut sy) = (0usize, 0.0, 0.0);
            for y in 0..h {
                for x in 0..w {
                    let at = |c: usize| f64::from(data[(c * frames + f) * plane + y * w + x]).clamp(0.0, 1.0) * 255.0;
                    let p = [at(0), at(1), at(2)];
                    let d = dist(p, target);
                    if d < MATCH_DISTANCE && palette.iter().all(|c| dist(p, *c) >= d) {
                        n += 1;
                        sx += x as f64 + 0.5;
                        sy += y as f64 + 0.5;
                    }
                }
            }
            (n >= MIN_PIXELS).then(|| [sx / n as f64, sy / n as f64])
        })
        .collect()
}

/// How the shape moved: from the first frame that shows it to the last.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Motion {
    /// Frames that show the shape.
    pub frames_seen: usize,
    /// Frames in the video.
    pub frames: usize,
    /// Travel in the prompt's direction, as a share of the frame's extent along it.
    pub along: f64,
    /// Travel across it (either way), as a share of the frame's extent across.
    pub across: f64,
}

impl Motion {
    /// Whether the shape was seen and travelled, from the first frame showing it to the last, at
    /// least [`MIN_TRAVEL`] of the frame in the prompt's direction.
    pub fn passes(&self) -> bool {
        self.frames_seen > 0 && self.along >= MIN_TRAVEL
    }
}

/// The shape's motion in `video` for `prompt` (`None` when no frame shows the shape).
pub fn motion(video: &Tensor, prompt: &DemoPrompt) -> Option<Motion> {
    let &[_, _, frames, h, w] = video.shape() else { return None };
    let seen: Vec<[f64; 2]> = track(video, prompt.rgb).into_iter().flatten().collect();
    let (first, last) = (seen.first()?, seen.last()?);
    let d = [last[0] - first[0], last[1] - first[1]];
    let [sx, sy] = prompt.step;
    let (extent_along, extent_across) = if sx != 0.0 { (w as f64, h as f64) } else { (h as f64, w as f64) };
    let along = (d[0] * sx + d[1] * sy) / extent_along;
    let across = (d[0] * sy - d[1] * sx).abs() / extent_across;
    Some(Motion { frames_seen: seen.len(), frames, along, across })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_prompt_is_one_the_demo_was_trained_on() {
        assert!(prompts().iter().any(|p| p.text() == EXAMPLE_PROMPT), "{EXAMPLE_PROMPT}");
    }

    /// A 64×64 video of `frames` frames on a gray background, a square of `rgb` moving by
    /// `(vx, vy)` pixels a frame from `(x0, y0)`.
    fn square(frames: usize, rgb: [u8; 3], x0: f64, y0: f64, vx: f64, vy: f64) -> Tensor {
        let (h, w) = (64, 64);
        let mut data = vec![0.3f32; 3 * frames * h * w];
        for f in 0..frames {
            let (cx, cy) = (x0 + vx * f as f64, y0 + vy * f as f64);
            for y in 0..h {
                for x in 0..w {
                    if (x as f64 + 0.5 - cx).abs() < 5.0 && (y as f64 + 0.5 - cy).abs() < 5.0 {
                        for c in 0..3 {
                            data[(c * frames + f) * h * w + y * w + x] = f32::from(rgb[c]) / 255.0;
                        }
                    }
                }
            }
        }
        Tensor::new(vec![1, 3, frames, h, w], data).unwrap()
    }

    #[test]
    fn there_are_sixty_prompts_captioned_as_in_training() {
        let all = prompts();
        assert_eq!(all.len(), 60);
        assert_eq!(all[0].text(), "a red ball moving left");
        assert_eq!(all[59].text(), "a white triangle moving down");
    }

    #[test]
    fn a_moving_square_is_tracked_and_judged_by_its_direction() {
        let red_right = prompts().into_iter().find(|p| p.text() == "a red square moving right").unwrap();
        // 20 px right over 16 frames on a 64-px frame: 31 % of it
        let video = square(17, red_right.rgb, 20.0, 30.0, 1.25, 0.0);
        let m = motion(&video, &red_right).unwrap();
        assert_eq!(m.frames_seen, 17);
        assert!((m.along - 20.0 / 64.0).abs() < 1e-9 && m.across.abs() < 1e-9, "{m:?}");
        assert!(m.passes());
        // the same video judged as "moving left" fails, and so does a short move
        let left = DemoPrompt { direction: "left", step: [-1.0, 0.0], ..red_right };
        assert!(!motion(&video, &left).unwrap().passes());
        assert!(!motion(&square(17, red_right.rgb, 20.0, 30.0, 0.5, 0.0), &red_right).unwrap().passes());
        // another color is not this one: a yellow square is no red square
        let yellow = square(17, [235, 215, 40], 20.0, 30.0, 1.25, 0.0);
        assert!(motion(&yellow, &red_right).is_none());
    }
}
