//! Where a request stands with a filter between its hooks, as a host tracks it: what may happen
//! to its body and trailers, and whether a wake-up may decide it again.
//!
//! The rule every host keeps: nothing of a request (headers, body chunks, trailers) reaches the
//! next filter before the filter decided to forward it. A request the filter paused is held whole
//! until it is decided again, however its body arrives (Content-Length, chunked, after a
//! `100 Continue`, HTTP/2 DATA and trailers); an answered one never goes on.

use edgewise_core::generic::reply::Reply;

use crate::Flow;

/// The answer to a request the filter failed on (a panic, or a stranded request): fail closed.
pub fn failed() -> Reply {
    Reply::new(500, "internal", "the filter failed on this request")
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Phase {
    /// The request headers have not been decided.
    #[default]
    Undecided,
    /// Held until the background wakes it to be decided again.
    Paused,
    /// Passed on: its body and trailers follow.
    Forwarded,
    /// Answered locally: nothing of it ever goes on.
    Answered,
}

/// What a request hook came to, as the host applies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decided {
    Forward,
    Pause,
    /// The filter replied (whatever it returned: a reply always wins).
    Answered,
    /// The filter held the request without replying or asking to be woken: it would hang until
    /// a timeout. The host answers it with a 500 instead (fail closed).
    Stranded,
}

impl Decided {
    /// The decision of a hook that returned `flow`, having `replied` or not and having asked for
    /// a waker (`woken_later`) or not.
    pub fn of(flow: Flow, replied: bool, woken_later: bool) -> Decided {
        match (flow, replied, woken_later) {
            (_, true, _) => Decided::Answered,
            (Flow::Continue, false, _) => Decided::Forward,
            (Flow::Stop, false, true) => Decided::Pause,
            (Flow::Stop, false, false) => Decided::Stranded,
        }
    }

    /// The phase it leaves the request in (a stranded one is answered by the host).
    pub fn phase(self) -> Phase {
        match self {
            Decided::Forward => Phase::Forwarded,
            Decided::Pause => Phase::Paused,
            Decided::Answered | Decided::Stranded => Phase::Answered,
        }
    }
}

impl Phase {
    /// Whether body chunks and trailers may go on to the next filter: only once the request was
    /// forwarded. Before that they are held (buffered under Envoy's flow control), after an
    /// answer dropped.
    pub fn passes_body(self) -> bool {
        self == Phase::Forwarded
    }

    /// Whether a wake-up decides the request again: only a paused one (a late or repeated
    /// wake-up of a request already forwarded or answered must change nothing).
    pub fn resumable(self) -> bool {
        self == Phase::Paused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_always_wins_and_a_hold_without_a_waker_is_stranded() {
        use Flow::{Continue, Stop};
        let table = [
            ((Continue, false, false), Decided::Forward),
            ((Continue, false, true), Decided::Forward),
            ((Continue, true, false), Decided::Answered),
            ((Stop, true, true), Decided::Answered),
            ((Stop, false, true), Decided::Pause),
            ((Stop, false, false), Decided::Stranded),
        ];
        for ((flow, replied, waker), want) in table {
            assert_eq!(Decided::of(flow, replied, waker), want, "{flow:?} replied={replied} waker={waker}");
        }
    }

    #[test]
    fn only_a_forwarded_request_passes_its_body_and_only_a_paused_one_is_resumed() {
        let all = [Phase::Undecided, Phase::Paused, Phase::Forwarded, Phase::Answered];
        let passes: Vec<Phase> = all.into_iter().filter(|p| p.passes_body()).collect();
        let resumes: Vec<Phase> = all.into_iter().filter(|p| p.resumable()).collect();
        assert_eq!((passes, resumes), (vec![Phase::Forwarded], vec![Phase::Paused]));
        assert_eq!(Decided::Stranded.phase(), Phase::Answered);
        assert_eq!(Decided::Pause.phase(), Phase::Paused);
    }
}
