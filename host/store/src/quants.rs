//! Dequantization of llama.cpp's block types to f32, by candle's
//! implementation of ggml's `dequantize_row_*` (Hugging Face's `candle-core`,
//! maintained beside llama.cpp's formats). probe only hands it whole blocks:
//! the byte count checked against the type's block size, and the bytes
//! copied to an aligned buffer when the mapping does not align them.

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8_0, GgmlType,
};
use probe_contract::Quant;

/// The block types probe dequantizes, each checked bit for bit against the
/// `gguf` Python package in the tests; the i-quants, ternary and FP4 types
/// are listed by `inspect` but their values cannot be read yet, and Q8_1 and
/// Q8_K are llama.cpp's internal dot-product types, never stored in files.
pub const READABLE: [Quant; 10] = [
    Quant::Q4_0,
    Quant::Q4_1,
    Quant::Q5_0,
    Quant::Q5_1,
    Quant::Q8_0,
    Quant::Q2_K,
    Quant::Q3_K,
    Quant::Q4_K,
    Quant::Q5_K,
    Quant::Q6_K,
];

/// The f32 values of `bytes`, whole blocks of `quant`; `Err` names what is
/// wrong (the caller adds the file and tensor).
pub fn dequantize(quant: Quant, bytes: &[u8]) -> Result<Vec<f32>, String> {
    match quant {
        Quant::Q4_0 => blocks::<BlockQ4_0>(quant, bytes),
        Quant::Q4_1 => blocks::<BlockQ4_1>(quant, bytes),
        Quant::Q5_0 => blocks::<BlockQ5_0>(quant, bytes),
        Quant::Q5_1 => blocks::<BlockQ5_1>(quant, bytes),
        Quant::Q8_0 => blocks::<BlockQ8_0>(quant, bytes),
        Quant::Q2_K => blocks::<BlockQ2K>(quant, bytes),
        Quant::Q3_K => blocks::<BlockQ3K>(quant, bytes),
        Quant::Q4_K => blocks::<BlockQ4K>(quant, bytes),
        Quant::Q5_K => blocks::<BlockQ5K>(quant, bytes),
        Quant::Q6_K => blocks::<BlockQ6K>(quant, bytes),
        other => Err(format!(
            "is stored as {other}, which probe cannot dequantize yet (readable: {})",
            READABLE.map(|q| q.as_str()).join(", ")
        )),
    }
}

fn blocks<T: GgmlType>(quant: Quant, bytes: &[u8]) -> Result<Vec<f32>, String> {
    let size = std::mem::size_of::<T>();
    // candle's block structs are ggml's C structs; a layout that disagreed
    // with the format's block size would misread every value.
    if size != quant.block_bytes() || T::BLCK_SIZE != quant.block_weights() {
        return Err(format!(
            "is stored as {quant}, whose block layout this build's dequantizer does not match ({size} bytes)"
        ));
    }
    if bytes.len() % size != 0 {
        return Err(format!(
            "holds {} bytes of {quant}, not whole blocks of {size}",
            bytes.len()
        ));
    }
    let count = bytes.len() / size;
    let mut out = vec![0f32; count * T::BLCK_SIZE];
    if (bytes.as_ptr() as usize) % std::mem::align_of::<T>() == 0 {
        // SAFETY: `T` is one of candle's `#[repr(C)]` ggml blocks, made of
        // f16/f32 scales and integer arrays, for which every bit pattern is
        // a valid value; the pointer is aligned for `T` (checked above) and
        // `count * size_of::<T>()` bytes are in bounds (`bytes.len()` is that).
        let typed = unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), count) };
        T::to_float(typed, &mut out);
    } else {
        let mut aligned: Vec<T> = Vec::with_capacity(count);
        // SAFETY: the buffer has room for `count` blocks, i.e. exactly
        // `bytes.len()` bytes; the two regions are distinct allocations; and
        // every bit pattern is a valid `T` (see above), so the length may be
        // set once the bytes are copied.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                aligned.as_mut_ptr().cast::<u8>(),
                bytes.len(),
            );
            aligned.set_len(count);
        }
        T::to_float(&aligned, &mut out);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_by_hand() {
        // One block: scale 0.5 (f16 0x3800), weights -64..=63 step 4.
        let mut block = 0x3800u16.to_le_bytes().to_vec();
        let q: Vec<i8> = (0..32).map(|i| (i * 4 - 64) as i8).collect();
        block.extend(q.iter().map(|&v| v as u8));
        let values = dequantize(Quant::Q8_0, &block).unwrap();
        let expected: Vec<f32> = q.iter().map(|&v| v as f32 * 0.5).collect();
        assert_eq!(values, expected);
        // The same bytes one byte into a buffer: not aligned for the block.
        let mut shifted = vec![0u8];
        shifted.extend(&block);
        assert_eq!(dequantize(Quant::Q8_0, &shifted[1..]).unwrap(), expected);
        assert!(dequantize(Quant::Q8_0, &block[..33])
            .unwrap_err()
            .contains("not whole blocks"));
        assert!(dequantize(Quant::IQ2_XS, &[0; 74])
            .unwrap_err()
            .contains("cannot dequantize yet"));
    }
}
