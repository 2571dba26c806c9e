//! Frame composition for animated GIF and APNG: each frame is a rectangle drawn onto a
//! persistent RGBA canvas (replacing, or alpha-composited over, what is there), and after it is
//! shown its rectangle is kept, cleared to transparent, or restored to what it was before — the
//! GIF disposal methods and the APNG `dispose_op`/`blend_op`, as browsers render them.

/// What happens to a frame's rectangle before the next frame is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Dispose {
    /// Left as drawn (GIF "none"/"keep", APNG `NONE`).
    Keep,
    /// Cleared to transparent (GIF "restore to background", APNG `BACKGROUND`).
    Clear,
    /// Restored to the canvas before the frame (GIF "restore to previous", APNG `PREVIOUS`).
    Restore,
}

/// How a frame's pixels combine with the canvas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Blend {
    /// The frame's pixels replace the rectangle, alpha included (APNG `SOURCE`).
    Replace,
    /// Alpha-composited over the canvas (APNG `OVER`; a GIF's transparent index).
    Over,
}

/// A frame's rectangle on the canvas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Rect {
    /// Left edge.
    pub x: u32,
    /// Top edge.
    pub y: u32,
    /// Width.
    pub w: u32,
    /// Height.
    pub h: u32,
}

/// The composed picture of an animation.
pub(super) struct Canvas {
    width: usize,
    height: usize,
    rgba: Vec<u8>,
    /// The rectangle under the last frame, for [`Dispose::Restore`].
    saved: Vec<u8>,
    /// The last frame's clipped rectangle and disposal.
    pending: Option<((usize, usize, usize, usize), Dispose)>,
}

impl Canvas {
    /// A transparent canvas (the caller has checked the size against the limits).
    pub fn new(width: u32, height: u32) -> Self {
        let (width, height) = (width as usize, height as usize);
        Self { width, height, rgba: vec![0; 4 * width * height], saved: Vec::new(), pending: None }
    }

    /// `rect` clipped to the canvas: (x0, y0, x1, y1).
    fn clip(&self, rect: Rect) -> (usize, usize, usize, usize) {
        let end = |start: u32, len: u32, max: usize| ((start as u64 + len as u64).min(max as u64)) as usize;
        let (x0, y0) = ((rect.x as usize).min(self.width), (rect.y as usize).min(self.height));
        (x0, y0, end(rect.x, rect.w, self.width), end(rect.y, rect.h, self.height))
    }

    /// Disposes of the previous frame, then draws `pixels` (RGBA rows of `rect.w`) into `rect`
    /// (the part outside the canvas is dropped) and remembers `dispose` for the next frame.
    pub fn draw(&mut self, rect: Rect, pixels: &[u8], blend: Blend, dispose: Dispose) -> Result<(), String> {
        let need = 4 * rect.w as u64 * rect.h as u64;
        if (pixels.len() as u64) < need {
            return Err(format!("a {}x{} frame has {} bytes of pixels, {need} needed", rect.w, rect.h, pixels.len()));
        }
        if let Some(((x0, y0, x1, y1), how)) = self.pending.take() {
            let row = 4 * (x1 - x0);
            for (i, y) in (y0..y1).enumerate() {
                let dst = &mut self.rgba[4 * (y * self.width + x0)..][..row];
                match how {
                    Dispose::Keep => break,
                    Dispose::Clear => dst.fill(0),
                    Dispose::Restore => dst.copy_from_slice(&self.saved[i * row..][..row]),
                }
            }
        }
        let (x0, y0, x1, y1) = self.clip(rect);
        let row = 4 * (x1 - x0);
        if dispose == Dispose::Restore {
            self.saved.clear();
            for y in y0..y1 {
                self.saved.extend_from_slice(&self.rgba[4 * (y * self.width + x0)..][..row]);
            }
        }
        for y in (y0..y1).filter(|_| x1 > x0) {
            let src_start = 4 * ((y - rect.y as usize) * rect.w as usize + (x0 - rect.x as usize));
            let src = &pixels[src_start..][..row];
            let dst = &mut self.rgba[4 * (y * self.width + x0)..][..row];
            match blend {
                Blend::Replace => dst.copy_from_slice(src),
                Blend::Over => src.chunks_exact(4).zip(dst.chunks_exact_mut(4)).for_each(|(s, d)| over(s, d)),
            }
        }
        self.pending = Some(((x0, y0, x1, y1), dispose));
        Ok(())
    }

    /// The canvas as planar RGB `[3, H, W]` in [0, 1], composed over black.
    pub fn to_planar_rgb(&self) -> Vec<f32> {
        let n = self.width * self.height;
        let mut out = vec![0.0f32; 3 * n];
        for (i, p) in self.rgba.chunks_exact(4).enumerate() {
            let a = p[3] as f32 / 255.0;
            for c in 0..3 {
                out[c * n + i] = p[c] as f32 / 255.0 * a;
            }
        }
        out
    }
}

/// Non-premultiplied "source over destination", in place.
fn over(s: &[u8], d: &mut [u8]) {
    match s[3] {
        0 => {}
        255 => d.copy_from_slice(s),
        sa => {
            let sa = sa as f32 / 255.0;
            let da = d[3] as f32 / 255.0 * (1.0 - sa);
            let oa = sa + da;
            for c in 0..3 {
                d[c] = ((s[c] as f32 * sa + d[c] as f32 * da) / oa).round() as u8;
            }
            d[3] = (oa * 255.0).round() as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RED: [u8; 4] = [255, 0, 0, 255];
    const BLUE: [u8; 4] = [0, 0, 255, 255];
    const CLEAR: [u8; 4] = [0, 0, 0, 0];

    fn solid(c: [u8; 4], n: usize) -> Vec<u8> {
        c.repeat(n)
    }

    fn px(canvas: &Canvas, x: usize, y: usize) -> [u8; 4] {
        canvas.rgba[4 * (y * canvas.width + x)..][..4].try_into().unwrap()
    }

    #[test]
    fn disposal_keeps_clears_or_restores_the_rectangle() {
        let full = Rect { x: 0, y: 0, w: 4, h: 2 };
        let patch = Rect { x: 1, y: 0, w: 2, h: 1 };
        let dot = Rect { x: 0, y: 1, w: 1, h: 1 };
        for (dispose, expect_at_patch) in [(Dispose::Keep, BLUE), (Dispose::Clear, CLEAR), (Dispose::Restore, RED)] {
            let mut c = Canvas::new(4, 2);
            c.draw(full, &solid(RED, 8), Blend::Replace, Dispose::Keep).unwrap();
            c.draw(patch, &solid(BLUE, 2), Blend::Over, dispose).unwrap();
            assert_eq!((px(&c, 1, 0), px(&c, 0, 0)), (BLUE, RED), "{dispose:?}: the frame is drawn");
            c.draw(dot, &solid(BLUE, 1), Blend::Over, Dispose::Keep).unwrap();
            assert_eq!(px(&c, 1, 0), expect_at_patch, "{dispose:?}");
            assert_eq!(px(&c, 2, 0), expect_at_patch, "{dispose:?}");
            assert_eq!((px(&c, 0, 0), px(&c, 3, 0), px(&c, 0, 1)), (RED, RED, BLUE), "{dispose:?}: outside the patch");
        }
    }

    #[test]
    fn transparent_pixels_and_alpha_blend_over_the_canvas() {
        let mut c = Canvas::new(2, 1);
        c.draw(Rect { x: 0, y: 0, w: 2, h: 1 }, &[RED, RED].concat(), Blend::Replace, Dispose::Keep).unwrap();
        c.draw(Rect { x: 0, y: 0, w: 2, h: 1 }, &[CLEAR, [0, 0, 255, 128]].concat(), Blend::Over, Dispose::Keep).unwrap();
        assert_eq!(px(&c, 0, 0), RED, "a transparent pixel leaves the canvas");
        assert_eq!(px(&c, 1, 0), [127, 0, 128, 255], "half blue over red");
        c.draw(Rect { x: 0, y: 0, w: 1, h: 1 }, &CLEAR, Blend::Replace, Dispose::Keep).unwrap();
        assert_eq!(px(&c, 0, 0), CLEAR, "replace copies alpha too");
        let rgb = c.to_planar_rgb();
        assert_eq!(rgb[0], 0.0, "transparent is composed over black");
        assert!((rgb[1] - 127.0 / 255.0).abs() < 1e-6 && (rgb[5] - 128.0 / 255.0).abs() < 1e-6, "{rgb:?}");
    }

    #[test]
    fn frames_past_the_edge_are_clipped_and_short_pixels_refused() {
        let mut c = Canvas::new(3, 3);
        c.draw(Rect { x: 2, y: 2, w: 2, h: 2 }, &solid(BLUE, 4), Blend::Over, Dispose::Clear).unwrap();
        assert_eq!(px(&c, 2, 2), BLUE);
        c.draw(Rect { x: u32::MAX, y: 5, w: 9, h: 9 }, &solid(RED, 81), Blend::Over, Dispose::Keep).unwrap();
        assert_eq!(px(&c, 2, 2), CLEAR, "disposed; the off-canvas frame draws nothing");
        c.draw(Rect { x: 5, y: 0, w: 2, h: 2 }, &solid(RED, 4), Blend::Over, Dispose::Restore).unwrap();
        c.draw(Rect { x: 0, y: 0, w: 1, h: 1 }, &solid(RED, 1), Blend::Over, Dispose::Keep).unwrap();
        assert_eq!((px(&c, 0, 0), px(&c, 2, 0)), (RED, CLEAR), "a frame right of the canvas draws nothing");
        assert!(c.draw(Rect { x: 0, y: 0, w: 2, h: 2 }, &solid(RED, 3), Blend::Over, Dispose::Keep).is_err());
    }
}
