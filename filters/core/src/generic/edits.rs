//! Header edits built on the stack: the (name, value) pairs a filter sets on a forwarded request
//! are few and bounded by its code, so listing them allocates nothing.

/// Up to `N` (name, value) pairs, in the order pushed.
#[derive(Debug, Clone, Copy)]
pub struct Edits<'a, const N: usize> {
    items: [(&'a str, &'a [u8]); N],
    len: usize,
}

impl<'a, const N: usize> Default for Edits<'a, N> {
    fn default() -> Self {
        Edits { items: [("", &[]); N], len: 0 }
    }
}

impl<'a, const N: usize> Edits<'a, N> {
    /// Adds a pair; false (and nothing added) once `N` are listed, which callers size so that
    /// it cannot happen (a test of theirs pushes the most they can).
    pub fn push(&mut self, name: &'a str, value: &'a [u8]) -> bool {
        match self.items.get_mut(self.len) {
            Some(slot) => {
                *slot = (name, value);
                self.len += 1;
                true
            }
            None => false,
        }
    }

    pub fn as_slice(&self) -> &[(&'a str, &'a [u8])] {
        self.items.get(..self.len).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_are_kept_in_order_up_to_the_capacity() {
        let mut edits = Edits::<2>::default();
        assert!(edits.as_slice().is_empty());
        assert!(edits.push("a", b"1"));
        assert!(edits.push("b", b"2"));
        assert!(!edits.push("c", b"3"), "full");
        assert_eq!(edits.as_slice(), [("a", &b"1"[..]), ("b", &b"2"[..])]);
    }
}
