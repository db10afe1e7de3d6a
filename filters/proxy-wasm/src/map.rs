//! The proxy-wasm map encoding (header maps, HTTP call headers): a u32 count, a (u32 name size,
//! u32 value size) pair per entry, then each name and value followed by a NUL byte, little endian.

pub fn serialize(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
    let size = 4 + pairs.iter().map(|(k, v)| 10 + k.len() + v.len()).sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// `None` when the encoding is malformed (nothing the host should send).
pub fn deserialize(bytes: &[u8]) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    let u32_at = |at: usize| -> Option<usize> {
        let b = bytes.get(at..at.checked_add(4)?)?;
        Some(u32::from_le_bytes(b.try_into().ok()?) as usize)
    };
    let count = u32_at(0)?;
    let mut data = 4usize.checked_add(count.checked_mul(8)?)?;
    let mut out = Vec::with_capacity(count.min(bytes.len() / 10));
    for i in 0..count {
        let (k, v) = (u32_at(4 + i * 8)?, u32_at(8 + i * 8)?);
        let key = bytes.get(data..data.checked_add(k)?)?;
        data = data.checked_add(k)?.checked_add(1)?;
        let value = bytes.get(data..data.checked_add(v)?)?;
        data = data.checked_add(v)?.checked_add(1)?;
        out.push((key.to_vec(), value.to_vec()));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_any_bytes() {
        let pairs: Vec<(&[u8], &[u8])> = vec![(b":path", b"/"), (b"x-any", b"caf\xe9\x00\xff"), (b"empty", b"")];
        let back = deserialize(&serialize(&pairs)).unwrap();
        let back: Vec<(&[u8], &[u8])> = back.iter().map(|(k, v)| (k.as_slice(), v.as_slice())).collect();
        assert_eq!(back, pairs);
    }

    #[test]
    fn malformed_maps_are_refused() {
        let good = serialize(&[(b"a", b"b")]);
        for cut in 0..good.len() - 1 {
            assert!(deserialize(&good[..cut]).is_none(), "cut at {cut}");
        }
        assert!(deserialize(&[0xff, 0xff, 0xff, 0xff]).is_none());
        assert_eq!(deserialize(&0u32.to_le_bytes()), Some(vec![]));
    }
}
