//! The delivery schedule: where each queued message stands, so that at
//! most one attempt or administrator's operation touches a message at a
//! time, whatever the administrator does and whenever.
//!
//! Every message has one [`Slot`]. A waiting message has exactly one entry
//! in the timer set, keyed by its due time; a held one has none, so it
//! cannot be started twice. Whoever holds a message (a [`Lease`]: one
//! attempt, or one bounce or delete) is the only one to change its state in
//! the spool, and gives the message back with the outcome; the schedule
//! then puts it back in the timers or forgets it.
//!
//! A retry (a kick) on a waiting message makes it due now; on a held one it
//! is remembered and takes effect when the hold ends, so many retries make
//! one attempt. A bounce or delete on a held message asks the holder to
//! stop at its next safe point (never in the middle of a transaction that
//! may already have delivered), waits for it to give the message back, and
//! takes it over before the timers can start another attempt.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use ferry_queue::QueueId;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Unix seconds.
pub type Time = i64;

/// Due at once: sorts before every real time.
const NOW: Time = 0;

/// A holder that went away without giving its message back (a panicked
/// attempt) leaves it for this long, so a fault does not spin.
const ABANDONED_RETRY_SECS: Time = 60;

/// How a holder gives its message back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The message left the queue (delivered, bounced, deleted, or it was
    /// already gone).
    Done,
    /// Try again at this time.
    RetryAt(Time),
    /// Nothing changed: back to where it was before the hold.
    Unchanged,
}

/// What a kick did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kick {
    /// The message was waiting: it is due now.
    Now,
    /// The message is being attempted or administered: one more attempt
    /// follows that one, however many kicks arrive meanwhile.
    AfterCurrent,
    /// The schedule does not know the message.
    Unknown,
}

/// Counts for `/status` and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ScheduleStats {
    /// Messages the schedule knows.
    pub messages: usize,
    /// Of them, waiting in the timers.
    pub waiting: usize,
    /// Of them, held by an attempt or an operation (or handed over).
    pub held: usize,
    /// Entries in the timer set: always `waiting`, one per message.
    pub timers: usize,
}

/// Where one message stands. (Every queued message has one, most of them
/// waiting: a held one's `Hold` is boxed so that a waiting one costs 16
/// bytes, not 64.)
enum Slot {
    /// Waiting for its next attempt; its one timer entry is `(at, id)`.
    Waiting { at: Time },
    /// An attempt or an operation has it.
    Held(Box<Hold>),
    /// The holder gave it back while operations were waiting for it: the
    /// first of them takes it; the timers never see it in between.
    HandedOver(Box<Hold>),
}

struct Hold {
    /// Where the message goes if the holder gives it back unchanged
    /// (`None`: nowhere, the schedule forgets it).
    resume: Option<Time>,
    /// A kick arrived during the hold: due at once after it.
    kick: bool,
    /// Asks the holder to stop at its next safe point.
    stop: CancellationToken,
    /// Operations waiting to take the message over.
    waiting: usize,
    /// Wakes them when the hold ends.
    released: Arc<Notify>,
}

impl Hold {
    fn new(resume: Option<Time>) -> Box<Self> {
        Box::new(Hold {
            resume,
            kick: false,
            stop: CancellationToken::new(),
            waiting: 0,
            released: Arc::new(Notify::new()),
        })
    }
}

#[derive(Default)]
struct State {
    slots: HashMap<QueueId, Slot>,
    /// `(due, id)` for every waiting message, and nothing else.
    timers: BTreeSet<(Time, QueueId)>,
}

impl State {
    fn wait(&mut self, id: QueueId, at: Time) {
        self.timers.insert((at, id.clone()));
        self.slots.insert(id, Slot::Waiting { at });
    }

    /// Where a message goes after its last hold: back to the timers (at
    /// once if it was kicked meanwhile), or nowhere once it is finished.
    fn settle(&mut self, id: &QueueId, hold: &Hold) {
        if let Some(at) = hold.resume {
            self.wait(id.clone(), if hold.kick { NOW } else { at });
        }
    }
}

/// The schedule of one delivery agent. Shared by the agent's loop, its
/// attempts and the admin endpoint.
#[derive(Default)]
pub struct Schedule {
    state: Mutex<State>,
    /// Wakes the agent's loop: something became due or a slot came free.
    wake: Notify,
}

impl Schedule {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a message due at `at` (a new arrival, or one found in the spool
    /// at start). A message already known keeps its place. The agent's
    /// loop calls this and looks at the timers right after: no wake-up.
    pub fn insert(&self, id: QueueId, at: Time) {
        let mut s = self.lock();
        match s.slots.get_mut(&id) {
            None => s.wait(id, at),
            // An operation took it before its arrival was seen: if the
            // operation leaves it unchanged it must still be tried.
            Some(Slot::Held(h) | Slot::HandedOver(h)) => {
                h.resume.get_or_insert(at);
            }
            Some(Slot::Waiting { .. }) => {}
        }
    }

    /// The earliest due time of a waiting message.
    pub fn next_due(&self) -> Option<Time> {
        self.lock().timers.first().map(|(at, _)| *at)
    }

    /// Resolves when the agent's loop should look again.
    pub async fn changed(&self) {
        self.wake.notified().await;
    }

    /// Takes the earliest message due by `now` for an attempt.
    pub fn take_due(self: &Arc<Self>, now: Time) -> Option<Lease> {
        let mut s = self.lock();
        let (at, id) = s.timers.first().cloned()?;
        if at > now {
            return None;
        }
        s.timers.remove(&(at, id.clone()));
        let hold = Hold::new(Some(at));
        let stop = hold.stop.clone();
        s.slots.insert(id.clone(), Slot::Held(hold));
        Some(Lease::new(Arc::clone(self), id, stop))
    }

    /// Asks for an attempt now (coalesced with one running).
    pub fn kick(&self, id: &QueueId) -> Kick {
        let mut s = self.lock();
        let State { slots, timers } = &mut *s;
        match slots.get_mut(id) {
            None => Kick::Unknown,
            Some(Slot::Held(h) | Slot::HandedOver(h)) => {
                h.kick = true;
                Kick::AfterCurrent
            }
            Some(Slot::Waiting { at }) => {
                if *at != NOW {
                    timers.remove(&(*at, id.clone()));
                    timers.insert((NOW, id.clone()));
                    *at = NOW;
                }
                drop(s);
                self.wake.notify_one();
                Kick::Now
            }
        }
    }

    /// Takes `id` over for an operation (bounce, delete): at once if it is
    /// waiting (or unknown: its arrival may not have been seen yet);
    /// otherwise once its holder gives it back, having asked the holder to
    /// stop if `stop_holder`.
    pub async fn hold(self: &Arc<Self>, id: &QueueId, stop_holder: bool) -> Lease {
        let mut waiter = Waiter {
            schedule: self,
            id,
            counted: false,
        };
        loop {
            match self.try_hold(id, stop_holder, &mut waiter.counted) {
                Ok(lease) => return lease,
                // `notify_one` leaves a permit when nobody waits yet, so a
                // release between the check and this wait is not missed.
                Err(released) => released.notified().await,
            }
        }
    }

    /// One try of [`Schedule::hold`]: the lease, or what to wait on.
    /// `counted`: whether the caller is counted in the holder's `waiting`.
    fn try_hold(
        self: &Arc<Self>,
        id: &QueueId,
        stop_holder: bool,
        counted: &mut bool,
    ) -> Result<Lease, Arc<Notify>> {
        let mut s = self.lock();
        let State { slots, timers } = &mut *s;
        let mut taken = match slots.remove(id) {
            None => Hold::new(None),
            Some(Slot::Waiting { at }) => {
                timers.remove(&(at, id.clone()));
                Hold::new(Some(at))
            }
            Some(Slot::HandedOver(mut hold)) => {
                if *counted {
                    hold.waiting = hold.waiting.saturating_sub(1);
                }
                hold
            }
            Some(Slot::Held(mut hold)) => {
                if !*counted {
                    hold.waiting += 1;
                    *counted = true;
                }
                if stop_holder {
                    hold.stop.cancel();
                }
                let released = Arc::clone(&hold.released);
                slots.insert(id.clone(), Slot::Held(hold));
                return Err(released);
            }
        };
        *counted = false;
        taken.stop = CancellationToken::new();
        let stop = taken.stop.clone();
        slots.insert(id.clone(), Slot::Held(taken));
        Ok(Lease::new(Arc::clone(self), id.clone(), stop))
    }

    /// Ends a hold with `outcome` (see [`Lease::release`]).
    fn give_back(&self, id: &QueueId, outcome: Outcome) {
        let mut s = self.lock();
        let Some(slot) = s.slots.remove(id) else {
            return;
        };
        let Slot::Held(mut hold) = slot else {
            // Not held: nothing of ours to give back.
            s.slots.insert(id.clone(), slot);
            return;
        };
        hold.resume = match outcome {
            Outcome::Done => None,
            Outcome::RetryAt(at) => Some(at),
            Outcome::Unchanged => hold.resume,
        };
        if hold.waiting > 0 {
            let released = Arc::clone(&hold.released);
            s.slots.insert(id.clone(), Slot::HandedOver(hold));
            drop(s);
            // One waiter at a time takes it over; the others wait for the
            // release of that one.
            released.notify_one();
            return;
        }
        s.settle(id, &hold);
        drop(s);
        self.wake.notify_one();
    }

    /// An operation stopped waiting for `id` before it got it (its caller
    /// went away).
    fn stop_waiting(&self, id: &QueueId) {
        let mut s = self.lock();
        match s.slots.get_mut(id) {
            Some(Slot::Held(hold)) => hold.waiting = hold.waiting.saturating_sub(1),
            Some(Slot::HandedOver(hold)) => {
                hold.waiting = hold.waiting.saturating_sub(1);
                if hold.waiting > 0 {
                    // It may have been this one's turn: pass it on.
                    hold.released.notify_one();
                    return;
                }
                if let Some(Slot::HandedOver(hold)) = s.slots.remove(id) {
                    s.settle(id, &hold);
                }
                drop(s);
                self.wake.notify_one();
            }
            Some(Slot::Waiting { .. }) | None => {}
        }
    }

    /// Counts, checked against each other.
    pub fn stats(&self) -> ScheduleStats {
        let s = self.lock();
        let waiting = s
            .slots
            .values()
            .filter(|slot| matches!(slot, Slot::Waiting { .. }))
            .count();
        ScheduleStats {
            messages: s.slots.len(),
            waiting,
            held: s.slots.len() - waiting,
            timers: s.timers.len(),
        }
    }

    /// Whether `id` is held by an attempt or an operation right now.
    pub fn is_held(&self, id: &QueueId) -> bool {
        matches!(
            self.lock().slots.get(id),
            Some(Slot::Held(_) | Slot::HandedOver(_))
        )
    }
}

/// The right to change one message's state, until it is given back.
pub struct Lease {
    schedule: Arc<Schedule>,
    id: QueueId,
    stop: CancellationToken,
    given_back: bool,
}

impl Lease {
    fn new(schedule: Arc<Schedule>, id: QueueId, stop: CancellationToken) -> Self {
        Lease {
            schedule,
            id,
            stop,
            given_back: false,
        }
    }

    pub fn id(&self) -> &QueueId {
        &self.id
    }

    /// Cancelled when an operation wants the message: stop at the next
    /// point where stopping loses nothing.
    pub fn stop(&self) -> &CancellationToken {
        &self.stop
    }

    /// Gives the message back with what became of it.
    pub fn release(mut self, outcome: Outcome) {
        self.given_back = true;
        self.schedule.give_back(&self.id, outcome);
    }
}

/// Takes a waiting operation off the count if it goes away before its
/// turn (a caller that hung up), so the message does not stay handed over
/// to nobody.
struct Waiter<'a> {
    schedule: &'a Schedule,
    id: &'a QueueId,
    counted: bool,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        if self.counted {
            self.schedule.stop_waiting(self.id);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.given_back {
            let at = chrono::Utc::now().timestamp() + ABANDONED_RETRY_SECS;
            self.schedule.give_back(&self.id, Outcome::RetryAt(at));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn id(n: u8) -> QueueId {
        QueueId::parse(&format!("{n:020X}")).unwrap()
    }

    fn stats(s: &Schedule) -> ScheduleStats {
        let st = s.stats();
        assert_eq!(st.timers, st.waiting, "one timer entry per waiting message");
        st
    }

    #[test]
    fn kicks_coalesce_into_one_attempt_after_the_current_one() {
        let s = Arc::new(Schedule::default());
        s.insert(id(1), 100);
        s.insert(id(1), 5); // known already: keeps its place
        assert_eq!(s.next_due(), Some(100));
        assert_eq!(s.kick(&id(1)), Kick::Now);
        assert_eq!(s.kick(&id(1)), Kick::Now);
        assert_eq!(stats(&s).timers, 1);
        let lease = s.take_due(50).expect("kicked: due now");
        assert!(s.take_due(i64::MAX).is_none(), "held: not startable twice");
        for _ in 0..5 {
            assert_eq!(s.kick(&id(1)), Kick::AfterCurrent);
        }
        assert_eq!(stats(&s).timers, 0);
        lease.release(Outcome::RetryAt(100));
        // The five kicks make one attempt, at once.
        let lease = s.take_due(50).expect("one attempt after the current one");
        lease.release(Outcome::RetryAt(100));
        assert!(s.take_due(50).is_none());
        assert_eq!(s.next_due(), Some(100));
        assert_eq!(s.kick(&id(2)), Kick::Unknown);
        assert_eq!(
            stats(&s),
            ScheduleStats {
                messages: 1,
                waiting: 1,
                held: 0,
                timers: 1
            }
        );
    }

    #[test]
    fn a_finished_message_is_forgotten_even_if_kicked() {
        let s = Arc::new(Schedule::default());
        s.insert(id(1), 0);
        let lease = s.take_due(1).unwrap();
        s.kick(&id(1));
        lease.release(Outcome::Done);
        assert_eq!(stats(&s), ScheduleStats::default());
    }

    #[tokio::test]
    async fn an_operation_stops_the_attempt_and_takes_over_before_the_timers() {
        let s = Arc::new(Schedule::default());
        s.insert(id(1), 0);
        let attempt = s.take_due(1).unwrap();
        let op = tokio::spawn({
            let s = Arc::clone(&s);
            async move { s.hold(&id(1), true).await }
        });
        tokio::time::timeout(Duration::from_secs(5), attempt.stop().cancelled())
            .await
            .expect("the attempt is asked to stop");
        assert!(!op.is_finished(), "the operation waits for the attempt");
        // Kicked meanwhile, and due: still, the operation comes first.
        s.kick(&id(1));
        attempt.release(Outcome::RetryAt(0));
        assert!(s.take_due(i64::MAX).is_none());
        let held = tokio::time::timeout(Duration::from_secs(5), op)
            .await
            .unwrap()
            .unwrap();
        assert!(!held.stop().is_cancelled());
        assert_eq!(stats(&s).held, 1);
        held.release(Outcome::Done);
        assert_eq!(stats(&s), ScheduleStats::default());
    }

    #[tokio::test]
    async fn operations_on_one_message_take_turns() {
        let s = Arc::new(Schedule::default());
        s.insert(id(1), 0);
        let attempt = s.take_due(1).unwrap();
        let ops: Vec<_> = (0..3)
            .map(|_| {
                let s = Arc::clone(&s);
                tokio::spawn(async move {
                    let lease = s.hold(&id(1), false).await;
                    assert!(s.take_due(i64::MAX).is_none());
                    tokio::task::yield_now().await;
                    lease.release(Outcome::Unchanged);
                })
            })
            .collect();
        tokio::task::yield_now().await;
        attempt.release(Outcome::RetryAt(7));
        for op in ops {
            tokio::time::timeout(Duration::from_secs(5), op)
                .await
                .unwrap()
                .unwrap();
        }
        // Unchanged by each operation: where the attempt left it.
        assert_eq!(s.next_due(), Some(7));
        assert_eq!(stats(&s).waiting, 1);
    }

    #[tokio::test]
    async fn an_operation_whose_caller_left_does_not_strand_the_message() {
        let s = Arc::new(Schedule::default());
        s.insert(id(1), 0);
        let attempt = s.take_due(1).unwrap();
        let gave_up = tokio::time::timeout(Duration::from_millis(20), s.hold(&id(1), false)).await;
        assert!(gave_up.is_err());
        attempt.release(Outcome::RetryAt(3));
        assert_eq!(s.next_due(), Some(3));
        assert!(s.take_due(3).is_some());
    }

    #[test]
    fn an_unknown_message_can_be_held_and_its_arrival_waits() {
        let s = Arc::new(Schedule::default());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let op = rt.block_on(s.hold(&id(1), true));
        s.insert(id(1), 0);
        assert!(s.take_due(1).is_none());
        op.release(Outcome::Unchanged);
        assert!(s.take_due(1).is_some(), "the arrival is tried after all");
    }

    #[test]
    fn an_abandoned_lease_comes_back_later() {
        let s = Arc::new(Schedule::default());
        s.insert(id(1), 0);
        drop(s.take_due(1).unwrap());
        let at = s.next_due().unwrap();
        assert!(at > chrono::Utc::now().timestamp() + 30, "{at}");
    }
}
