//! Working space of one filter configuration for each thread that runs it: a worker reuses its
//! own, with no lock shared by all workers and no allocation once warm. Natively one
//! configuration object serves every worker; in a wasm VM there is one thread.

use std::any::Any;
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

/// How many configurations' spaces a thread keeps: a reload makes a new configuration, and the
/// space of the one least recently used goes.
const KEPT: usize = 4;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// (configuration id, its space), most recently used first.
    static SPACES: RefCell<Vec<(u64, Box<dyn Any>)>> = const { RefCell::new(Vec::new()) };
}

pub struct PerThread<T> {
    id: u64,
    seed: T,
}

impl<T: Clone + 'static> PerThread<T> {
    /// Each thread's space starts as a clone of `seed`.
    pub fn new(seed: T) -> Self {
        PerThread { id: NEXT_ID.fetch_add(1, Ordering::Relaxed), seed }
    }

    /// Runs `f` with this thread's space. Re-entered on the same thread (which the hosts do not
    /// do inside a hook), `f` gets a fresh clone rather than a panic.
    pub fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        let taken = SPACES.with(|spaces| {
            let mut spaces = spaces.try_borrow_mut().ok()?;
            let at = spaces.iter().position(|(id, _)| *id == self.id)?;
            Some(spaces.swap_remove(at).1)
        });
        let mut space = match taken.map(|b| b.downcast::<T>()) {
            Some(Ok(space)) => space,
            _ => Box::new(self.seed.clone()),
        };
        let value = f(&mut space);
        SPACES.with(|spaces| {
            if let Ok(mut spaces) = spaces.try_borrow_mut() {
                if spaces.len() >= KEPT {
                    spaces.pop();
                }
                spaces.insert(0, (self.id, space));
            }
        });
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_thread_and_configuration_has_its_own_space_kept_between_calls() {
        let a = PerThread::new(0u32);
        let b = PerThread::new(100u32);
        a.with(|n| *n += 1);
        b.with(|n| *n += 1);
        assert_eq!(a.with(|n| *n), 1);
        assert_eq!(b.with(|n| *n), 101);
        std::thread::scope(|s| {
            s.spawn(|| assert_eq!(a.with(|n| *n), 0, "another thread starts from the seed"));
        });
        // Re-entered: a fresh clone, not a panic.
        a.with(|outer| {
            *outer += 1;
            assert_eq!(a.with(|inner| *inner), 0);
        });
        assert_eq!(a.with(|n| *n), 2);
    }

    #[test]
    fn a_thread_keeps_the_spaces_of_the_configurations_it_used_last() {
        let all: Vec<_> = (0..KEPT as u32 + 1).map(PerThread::new).collect();
        for p in &all {
            p.with(|n| *n += 1000);
        }
        assert_eq!(all[0].with(|n| *n), 0, "the least recently used was dropped");
        assert_eq!(all[KEPT].with(|n| *n), KEPT as u32 + 1000);
    }
}
