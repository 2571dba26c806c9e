//! H.264 sequence parameter set parsing (ITU-T H.264 §7.3.2.1.1 and Annex E.1.1), as far as the
//! frame size, chroma format, bit depth, frame/field coding and colour description: the facts
//! needed to refuse a stream before it is decoded and to convert its pictures to RGB.

use super::corrupt;
use super::yuv::YuvColour;
use crate::Result;

const FORMAT: &str = "mp4/h264";

/// What a sequence parameter set says.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Sps {
    /// Width in whole macroblocks (before cropping).
    pub coded_width: u32,
    /// Height in whole macroblocks (before cropping).
    pub coded_height: u32,
    /// Width after the cropping window.
    pub width: u32,
    /// Height after the cropping window.
    pub height: u32,
    /// 0 monochrome, 1 4:2:0, 2 4:2:2, 3 4:4:4.
    pub chroma_format_idc: u32,
    /// Luma bit depth.
    pub bit_depth_luma: u32,
    /// Chroma bit depth.
    pub bit_depth_chroma: u32,
    /// Progressive (frame macroblocks only).
    pub frame_mbs_only: bool,
    /// The Y′CbCr matrix and range to convert pictures with.
    pub colour: YuvColour,
}

/// Reads bits, MSB first, from a NAL unit's payload with emulation prevention bytes removed.
struct BitReader {
    rbsp: Vec<u8>,
    bit: usize,
}

impl BitReader {
    fn new(payload: &[u8]) -> Self {
        let mut rbsp = Vec::with_capacity(payload.len());
        let mut zeros = 0;
        for &b in payload {
            if zeros >= 2 && b == 3 {
                zeros = 0;
                continue;
            }
            zeros = if b == 0 { zeros + 1 } else { 0 };
            rbsp.push(b);
        }
        Self { rbsp, bit: 0 }
    }

    fn u1(&mut self) -> Result<u32> {
        let byte = self.rbsp.get(self.bit / 8).ok_or_else(|| corrupt(FORMAT, "a sequence parameter set ends early"))?;
        let v = (byte >> (7 - self.bit % 8)) & 1;
        self.bit += 1;
        Ok(v as u32)
    }

    fn flag(&mut self) -> Result<bool> {
        Ok(self.u1()? == 1)
    }

    fn bits(&mut self, n: u32) -> Result<u32> {
        (0..n).try_fold(0u32, |acc, _| Ok((acc << 1) | self.u1()?))
    }

    /// Unsigned Exp-Golomb (at most 32 leading zeros: values up to 2³² − 2).
    fn ue(&mut self) -> Result<u32> {
        let mut zeros = 0;
        while self.u1()? == 0 {
            zeros += 1;
            if zeros > 31 {
                return Err(corrupt(FORMAT, "an Exp-Golomb code in a sequence parameter set is too long"));
            }
        }
        let rest = self.bits(zeros)?;
        Ok(((1u64 << zeros) - 1 + rest as u64) as u32)
    }

    /// Signed Exp-Golomb.
    fn se(&mut self) -> Result<i64> {
        let k = self.ue()? as i64;
        Ok(if k % 2 == 1 { (k + 1) / 2 } else { -(k / 2) })
    }

    /// `ue` checked to be at most `max`.
    fn ue_max(&mut self, max: u32, what: &str) -> Result<u32> {
        let v = self.ue()?;
        if v > max {
            return Err(corrupt(FORMAT, format!("{what} is {v}, at most {max} is allowed")));
        }
        Ok(v)
    }
}

/// Skips a `scaling_list` of `size` entries (§7.3.2.1.1.1).
fn skip_scaling_list(r: &mut BitReader, size: usize) -> Result<()> {
    let (mut last, mut next) = (8i64, 8i64);
    for _ in 0..size {
        if next != 0 {
            let delta = r.se()?;
            if !(-128..=127).contains(&delta) {
                return Err(corrupt(FORMAT, format!("a scaling list delta is {delta}")));
            }
            next = (last + delta + 256) % 256;
        }
        if next != 0 {
            last = next;
        }
    }
    Ok(())
}

/// Parses a sequence parameter set NAL unit (header byte included).
pub(super) fn parse_sps(nal: &[u8]) -> Result<Sps> {
    if nal.first().map(|b| b & 0x1f) != Some(7) {
        return Err(corrupt(FORMAT, "a sequence parameter set has the wrong NAL unit type"));
    }
    let mut r = BitReader::new(&nal[1..]);
    let profile_idc = r.bits(8)?;
    r.bits(16)?; // constraint flags, level
    r.ue_max(31, "seq_parameter_set_id")?;
    let (mut chroma_format_idc, mut separate_colour_plane, mut bit_depth_luma, mut bit_depth_chroma) = (1, false, 8, 8);
    if matches!(profile_idc, 100 | 110 | 122 | 244 | 44 | 83 | 86 | 118 | 128 | 138 | 139 | 134 | 135) {
        chroma_format_idc = r.ue_max(3, "chroma_format_idc")?;
        if chroma_format_idc == 3 {
            separate_colour_plane = r.flag()?;
        }
        bit_depth_luma = r.ue_max(6, "bit_depth_luma_minus8")? + 8;
        bit_depth_chroma = r.ue_max(6, "bit_depth_chroma_minus8")? + 8;
        r.u1()?; // qpprime_y_zero_transform_bypass_flag
        if r.flag()? {
            let lists = if chroma_format_idc == 3 { 12 } else { 8 };
            for i in 0..lists {
                if r.flag()? {
                    skip_scaling_list(&mut r, if i < 6 { 16 } else { 64 })?;
                }
            }
        }
    }
    r.ue_max(12, "log2_max_frame_num_minus4")?;
    match r.ue_max(2, "pic_order_cnt_type")? {
        0 => {
            r.ue_max(12, "log2_max_pic_order_cnt_lsb_minus4")?;
        }
        1 => {
            r.u1()?; // delta_pic_order_always_zero_flag
            r.se()?; // offset_for_non_ref_pic
            r.se()?; // offset_for_top_to_bottom_field
            let cycle = r.ue_max(255, "num_ref_frames_in_pic_order_cnt_cycle")?;
            for _ in 0..cycle {
                r.se()?;
            }
        }
        _ => {}
    }
    r.ue_max(16, "max_num_ref_frames")?;
    r.u1()?; // gaps_in_frame_num_value_allowed_flag
             // Sizes in macroblocks: anything beyond 2¹⁶ macroblocks a side is corrupt whatever the limits.
    let width_mbs = r.ue_max(u16::MAX as u32, "pic_width_in_mbs_minus1")? as u64 + 1;
    let height_units = r.ue_max(u16::MAX as u32, "pic_height_in_map_units_minus1")? as u64 + 1;
    let frame_mbs_only = r.flag()?;
    if !frame_mbs_only {
        r.u1()?; // mb_adaptive_frame_field_flag
    }
    r.u1()?; // direct_8x8_inference_flag
    let coded_width = width_mbs * 16;
    let coded_height = height_units * 16 * if frame_mbs_only { 1 } else { 2 };
    let (mut width, mut height) = (coded_width, coded_height);
    if r.flag()? {
        let (left, right, top, bottom) = (r.ue()? as u64, r.ue()? as u64, r.ue()? as u64, r.ue()? as u64);
        let chroma_array_type = if separate_colour_plane { 0 } else { chroma_format_idc };
        let (sub_w, sub_h) = match chroma_array_type {
            1 => (2, 2),
            2 => (2, 1),
            _ => (1, 1),
        };
        let unit_x = if chroma_array_type == 0 { 1 } else { sub_w };
        let unit_y = (if chroma_array_type == 0 { 1 } else { sub_h }) * if frame_mbs_only { 1 } else { 2 };
        let (crop_w, crop_h) = ((left + right) * unit_x, (top + bottom) * unit_y);
        if crop_w >= coded_width || crop_h >= coded_height {
            return Err(corrupt(FORMAT, format!("the cropping window ({crop_w}x{crop_h} cropped) leaves nothing of {coded_width}x{coded_height}")));
        }
        width -= crop_w;
        height -= crop_h;
    }
    let colour = if r.flag()? { vui_colour(&mut r, coded_height)? } else { YuvColour::unspecified(coded_height as u32) };
    Ok(Sps {
        coded_width: coded_width as u32,
        coded_height: coded_height as u32,
        width: width as u32,
        height: height as u32,
        chroma_format_idc,
        bit_depth_luma,
        bit_depth_chroma,
        frame_mbs_only,
        colour,
    })
}

/// The colour description at the start of `vui_parameters` (Annex E.1.1).
fn vui_colour(r: &mut BitReader, coded_height: u64) -> Result<YuvColour> {
    if r.flag()? && r.bits(8)? == 255 {
        r.bits(32)?; // sar_width, sar_height
    }
    if r.flag()? {
        r.u1()?; // overscan_appropriate_flag
    }
    let mut colour = YuvColour::unspecified(coded_height as u32);
    if r.flag()? {
        r.bits(3)?; // video_format
        colour.full_range = r.flag()?;
        if r.flag()? {
            r.bits(16)?; // colour_primaries, transfer_characteristics
            colour = YuvColour::from_matrix_coefficients(r.bits(8)?, coded_height as u32, colour.full_range);
        }
    }
    Ok(colour)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes bits and Exp-Golomb codes (for building test parameter sets).
    #[derive(Default)]
    struct BitWriter {
        bits: Vec<bool>,
    }

    impl BitWriter {
        fn put(&mut self, v: u64, n: u32) -> &mut Self {
            for i in (0..n).rev() {
                self.bits.push((v >> i) & 1 == 1);
            }
            self
        }
        fn ue(&mut self, v: u64) -> &mut Self {
            let x = v + 1;
            let len = 64 - x.leading_zeros();
            self.put(0, len - 1).put(x, len)
        }
        fn bytes(&self) -> Vec<u8> {
            let mut out: Vec<u8> = self.bits.chunks(8).map(|c| c.iter().enumerate().fold(0u8, |a, (i, &b)| a | ((b as u8) << (7 - i)))).collect();
            out.insert(0, 0x67);
            out
        }
    }

    /// A baseline SPS of `w_mbs`×`h_mbs` macroblocks with an optional crop (right, bottom) and
    /// optional VUI colour (full range, matrix).
    fn baseline(w_mbs: u64, h_mbs: u64, crop: Option<(u64, u64)>, vui: Option<(bool, u64)>) -> Vec<u8> {
        let mut w = BitWriter::default();
        w.put(66, 8).put(0xc0, 8).put(30, 8).ue(0).ue(0).ue(0).ue(0).ue(1).put(0, 1).ue(w_mbs - 1).ue(h_mbs - 1).put(1, 1).put(1, 1);
        match crop {
            Some((right, bottom)) => w.put(1, 1).ue(0).ue(right).ue(0).ue(bottom),
            None => w.put(0, 1),
        };
        match vui {
            Some((full, matrix)) => w.put(1, 1).put(0, 1).put(0, 1).put(1, 1).put(5, 3).put(full as u64, 1).put(1, 1).put(1, 8).put(1, 8).put(matrix, 8),
            None => w.put(0, 1),
        };
        w.put(1, 1); // rbsp stop bit
        w.bytes()
    }

    #[test]
    fn sizes_crops_and_colour_are_read() {
        let s = parse_sps(&baseline(4, 3, None, None)).unwrap();
        assert_eq!((s.coded_width, s.coded_height, s.width, s.height), (64, 48, 64, 48));
        assert_eq!((s.chroma_format_idc, s.bit_depth_luma, s.frame_mbs_only), (1, 8, true));
        assert_eq!(s.colour, YuvColour::unspecified(48));
        // 1920×1080 is coded as 1920×1088 with 4 chroma rows (8 luma rows) cropped at the bottom.
        let s = parse_sps(&baseline(120, 68, Some((0, 4)), Some((false, 1)))).unwrap();
        assert_eq!((s.coded_width, s.coded_height, s.width, s.height), (1920, 1088, 1920, 1080));
        assert_eq!(s.colour, YuvColour::from_matrix_coefficients(1, 1088, false));
        let s = parse_sps(&baseline(3, 2, Some((1, 1)), Some((true, 6)))).unwrap();
        assert_eq!((s.width, s.height), (46, 30));
        assert!(s.colour.full_range);
    }

    #[test]
    fn bad_parameter_sets_are_errors() {
        let good = baseline(4, 3, Some((1, 1)), Some((false, 1)));
        for cut in 1..good.len() - 1 {
            assert!(parse_sps(&good[..cut]).is_err(), "cut at {cut}");
        }
        assert!(parse_sps(&[0x68, 1, 2]).unwrap_err().to_string().contains("NAL unit type"));
        assert!(parse_sps(&baseline(4, 3, Some((2, 0)), None)).is_ok());
        assert!(parse_sps(&baseline(1, 1, Some((8, 0)), None)).unwrap_err().to_string().contains("cropping window"));
        assert!(parse_sps(&[0x67, 66, 0, 30, 0, 0, 0, 0, 0x80]).unwrap_err().to_string().contains("too long"));
    }

    #[test]
    fn emulation_prevention_bytes_are_removed() {
        let r = BitReader::new(&[0, 0, 3, 1, 0, 0, 3, 0, 0, 3]);
        assert_eq!(r.rbsp, vec![0, 0, 1, 0, 0, 0, 0]);
        let mut r = BitReader::new(&[0b0010_0011, 0b0010_0000]);
        assert_eq!((r.ue().unwrap(), r.se().unwrap(), r.se().unwrap()), (3, -1, 2));
    }
}
