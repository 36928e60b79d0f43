//! Delivery: takes messages from the spool when they are due, sends each
//! recipient's copy along its route, records a state per recipient,
//! retries temporary failures on the configured schedule, and reports to
//! the sender (a delay notice, then a bounce) as RFC 3464 DSNs.
//!
//! Which message is tried when is the [`schedule`]'s business: one
//! attempt or one administrator's operation per message at a time.

mod admin;
mod body;
mod client;
mod directory;
mod mx;
mod pool;
pub mod schedule;

pub use admin::{QueueAdmin, Readiness};

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ferry_client::Verify;
use ferry_config::{ClusterConfig, NextHop, Route, RouteAction, TlsPolicy};
use ferry_queue::dsn::{self, Report, ReportKind, ReportedRecipient};
use ferry_queue::{
    DeliveryState, Journal, QueueId, RecipientState, Spool, SpooledMessage, StoredEnvelope,
};
use ferry_smtp::{Domain, Mailbox, ReversePath};
use metrics::counter;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

pub use client::{HopError, RecipientOutcome};

use crate::core::Core;
use crate::metric;
use crate::tracking::TrackingEvent;
use body::{Body, READ_INLINE};
use mx::{MxError, MxResolver};
use pool::Target;
use schedule::{Lease, Outcome, Schedule, ScheduleStats};

/// Attempts running at once.
const CONCURRENT_ATTEMPTS: usize = 64;

/// The worker's delivery agent.
pub struct Deliverer {
    core: Arc<Core>,
    journal: Journal,
    slots: Arc<Semaphore>,
    sessions: pool::SessionPool,
    resolver: MxResolver,
    /// Where every queued message stands: waiting, or held by one attempt
    /// or one administrator's operation.
    schedule: Arc<Schedule>,
}

fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}

impl Deliverer {
    /// The delivery agent of the worker whose core is `core`, taking
    /// messages from `journal` (the core's spool).
    pub fn new(core: Arc<Core>, journal: Journal) -> Arc<Self> {
        Arc::new(Self {
            core,
            journal,
            slots: Arc::new(Semaphore::new(CONCURRENT_ATTEMPTS)),
            sessions: pool::SessionPool::default(),
            resolver: MxResolver::default(),
            schedule: Arc::default(),
        })
    }

    /// Delivers until `shutdown` is cancelled. Every message in the spool
    /// (and every one stored from now on) waits in the schedule for its
    /// next attempt; an attempt starts when one is due and one of the
    /// [`CONCURRENT_ATTEMPTS`] slots is free, and gives the message back
    /// with its next time (or not, once it is done).
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(mut arrivals) = self.journal.take_arrivals() else {
            warn!("a delivery agent already runs on this spool");
            return;
        };
        for (id, at) in self.journal.due_times() {
            self.schedule.insert(id, at);
        }
        self.remove_directory_leftovers().await;
        let mut gauges_at = tokio::time::Instant::now();
        let mut sweeps = tokio::time::interval(pool::IDLE_FOR);
        loop {
            let now = unix_now();
            // A slot first, then a message: one left waiting stays
            // visible to retries and operations, never held for nothing.
            while let Ok(permit) = Arc::clone(&self.slots).try_acquire_owned() {
                let Some(lease) = self.schedule.take_due(now) else {
                    break;
                };
                let me = Arc::clone(&self);
                let span = tracing::info_span!("delivery", queue_id = %lease.id());
                tokio::spawn(
                    async move {
                        let outcome = me.attempt(&lease).await;
                        drop(permit);
                        lease.release(outcome);
                    }
                    .instrument(span),
                );
            }
            if gauges_at.elapsed() >= Duration::from_secs(5) {
                self.queue_gauges(now);
                gauges_at = tokio::time::Instant::now();
            }
            let wait = self
                .schedule
                .next_due()
                .map_or(60, |t| (t - now).clamp(1, 60));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                Some(id) = arrivals.recv() => self.schedule.insert(id, 0),
                // A retry, or an attempt given back (its slot is free).
                _ = self.schedule.changed() => {}
                _ = sweeps.tick() => self.sessions.sweep(),
                _ = tokio::time::sleep(Duration::from_secs(u64::try_from(wait).unwrap_or(1))) => {}
            }
        }
    }

    /// Asks for an attempt now (queue administration); one already running
    /// is followed by one more, however many retries arrive meanwhile.
    pub fn kick(&self, id: &QueueId) -> schedule::Kick {
        self.schedule.kick(id)
    }

    /// The schedule's counts (for tests and status).
    pub fn schedule_stats(&self) -> ScheduleStats {
        self.schedule.stats()
    }

    /// Removes the temp files a crash left in the folders of directory
    /// routes (a re-delivery would replace them anyway; a message that is
    /// never delivered again would leave them for good).
    async fn remove_directory_leftovers(&self) {
        let config = Arc::clone(&self.core.current().config);
        for route in &config.routes {
            let RouteAction::Directory(dir) = &route.action else {
                continue;
            };
            let dir = dir.clone();
            let shown = dir.display().to_string();
            match tokio::task::spawn_blocking(move || directory::remove_leftovers(&dir)).await {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => info!(folder = %shown, removed = n, "removed temp files a crash left"),
                Ok(Err(e)) => {
                    warn!(folder = %shown, error = %e, "cannot clear temp files a crash left")
                }
                Err(e) => warn!(folder = %shown, error = %e, "clearing temp files failed"),
            }
        }
    }

    /// Messages by state and the oldest one's age: counts from the
    /// spool's index, the age from the oldest message's envelope (one
    /// small read).
    fn queue_gauges(&self, now: i64) {
        let counts = self.journal.counts();
        let oldest = match counts.oldest.map(|id| self.journal.message(&id)) {
            Some(Ok(Some(m))) => m.envelope.received_at,
            // Gone meanwhile, or unreadable (the attempt says so).
            _ => now,
        };
        metrics::gauge!(metric::QUEUE_MESSAGES, "state" => "new")
            .set(counts.messages.saturating_sub(counts.deferred) as f64);
        metrics::gauge!(metric::QUEUE_MESSAGES, "state" => "deferred").set(counts.deferred as f64);
        metrics::gauge!(metric::QUEUE_OLDEST_AGE).set((now - oldest).max(0) as f64);
    }

    /// One delivery attempt for every pending recipient of the message
    /// `lease` holds, its envelope and state read from the spool (what
    /// the last attempt or operation recorded). Returns what became of it.
    async fn attempt(&self, lease: &Lease) -> Outcome {
        let m = match self.journal.message(lease.id()) {
            Ok(Some(m)) => m,
            // Retired while it waited (deleted, or finished by an operation).
            Ok(None) => return Outcome::Done,
            Err(e) => {
                let config = Arc::clone(&self.core.current().config);
                warn!(error = %e, "cannot read the message's envelope and state from the spool; trying later");
                return Outcome::RetryAt(
                    unix_now() + config.delivery.retry_interval.as_secs().max(1) as i64,
                );
            }
        };
        if lease.stop().is_cancelled() {
            return Outcome::Unchanged;
        }
        let started = std::time::Instant::now();
        let outcome = self.attempt_inner(m, lease.stop()).await;
        metrics::histogram!(metric::DELIVERY_DURATION).record(started.elapsed().as_secs_f64());
        outcome
    }

    /// A message's bytes, opened to be read in pieces as they are sent.
    /// A message in chunks is opened on the blocking pool (its commit
    /// record is read for the list of its chunks); a small one, most mail,
    /// on the runtime's thread.
    pub(crate) async fn read_body(&self, m: &SpooledMessage) -> std::io::Result<Arc<Body>> {
        if m.size() <= READ_INLINE {
            return self.journal.open_body(m).map(|b| Arc::new(Body::new(b)));
        }
        let (journal, m) = (self.journal.clone(), m.clone());
        tokio::task::spawn_blocking(move || journal.open_body(&m))
            .await
            .map_err(std::io::Error::other)?
            .map(|b| Arc::new(Body::new(b)))
    }

    /// The attempt proper. `stop`: an operation wants the message; groups
    /// not yet sent are left as they were, and an attempt stopped before
    /// any recipient had an outcome leaves the message unchanged (it does
    /// not count as an attempt).
    async fn attempt_inner(&self, m: SpooledMessage, stop: &CancellationToken) -> Outcome {
        // The snapshot in service now: a route changed since the last
        // attempt applies to this one.
        let config = Arc::clone(&self.core.current().config);
        let message = match self.read_body(&m).await {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "cannot read the message from the spool; trying later");
                let mut state = m.state.clone();
                state.next_attempt = unix_now() + config.delivery.retry_interval.as_secs() as i64;
                let _ = self.journal.record_state(&m.id, &state).await;
                return Outcome::RetryAt(state.next_attempt);
            }
        };
        let mut state = m.state.clone();
        state.attempts += 1;
        let mut tried = false;

        // Recipients grouped by the route that takes them.
        let mut groups: Vec<(Option<usize>, Vec<Mailbox>)> = Vec::new();
        for r in state.pending() {
            let route = config
                .route_for(r.address.domain())
                .and_then(|route| config.routes.iter().position(|x| std::ptr::eq(x, route)));
            match groups.iter_mut().find(|(k, _)| *k == route) {
                Some((_, list)) => list.push(r.address.clone()),
                None => groups.push((route, vec![r.address.clone()])),
            }
        }
        for (route, recipients) in groups {
            if stop.is_cancelled() {
                info!(
                    attempt = state.attempts,
                    "attempt stopped for an administrator's operation"
                );
                break;
            }
            let route = route.and_then(|i| config.routes.get(i));
            let results = self
                .send_group(&config, route, &m, &recipients, &message, stop)
                .await;
            for (address, result) in results {
                tried = true;
                self.track(&m, &address, &result, state.attempts);
                if let Some(r) = state.recipients.iter_mut().find(|r| r.address == address) {
                    r.state = result;
                }
            }
        }
        if !tried && stop.is_cancelled() {
            return Outcome::Unchanged;
        }
        self.conclude(&config, &m, state, &message)
            .await
            .map_or(Outcome::Done, Outcome::RetryAt)
    }

    /// Sends one route's group; returns a state for each recipient that
    /// has one (none for those not tried because `stop` came first).
    async fn send_group(
        &self,
        config: &ClusterConfig,
        route: Option<&Route>,
        m: &SpooledMessage,
        recipients: &[Mailbox],
        message: &Arc<Body>,
        stop: &CancellationToken,
    ) -> Vec<(Mailbox, RecipientState)> {
        let Some(route) = route else {
            counter!(metric::DELIVERY_ATTEMPTS, "result" => "no_route").increment(1);
            return each(
                recipients,
                RecipientState::Failed {
                    reply: "550 5.4.4 No route for the recipient's domain".into(),
                    next_hop: None,
                },
            );
        };
        match &route.action {
            RouteAction::Directory(dir) => {
                let (dir, id, env, rcpts, msg) = (
                    dir.clone(),
                    m.id.clone(),
                    m.envelope.clone(),
                    recipients.to_vec(),
                    Arc::clone(message),
                );
                let written = tokio::task::spawn_blocking(move || {
                    directory::write_eml(&dir, &id, &env, &rcpts, msg.spooled())
                })
                .await;
                let hop = format!("directory:{}", route_path(route));
                match written {
                    Ok(Ok(name)) => {
                        counter!(metric::DELIVERY_ATTEMPTS, "result" => "delivered").increment(1);
                        info!(next_hop = %hop, file = %name, recipients = recipients.len(), "delivered");
                        each(
                            recipients,
                            RecipientState::Delivered {
                                next_hop: hop,
                                reply: format!("250 2.0.0 written as {name}"),
                            },
                        )
                    }
                    Ok(Err(e)) => {
                        counter!(metric::DELIVERY_ATTEMPTS, "result" => "deferred").increment(1);
                        warn!(next_hop = %hop, error = %e, "directory delivery failed; deferred");
                        each(
                            recipients,
                            RecipientState::Deferred {
                                reply: format!("451 4.3.0 cannot write to {hop}: {e}"),
                            },
                        )
                    }
                    Err(e) => each(
                        recipients,
                        RecipientState::Deferred {
                            reply: format!("451 4.3.0 delivery task failed: {e}"),
                        },
                    ),
                }
            }
            RouteAction::Smtp {
                next_hops,
                tls,
                verify_certificates,
                ca_file,
                auth,
            } => {
                let trust = (*verify_certificates, ca_file.as_deref());
                let settings = match self.hop_settings(config, *tls, trust, auth.as_ref()) {
                    Ok(s) => s,
                    Err(reply) => return deferred_locally(recipients, reply),
                };
                let targets: Vec<Target<'_>> = next_hops
                    .iter()
                    .map(|hop| Target { hop, address: None })
                    .collect();
                self.relay(config, &targets, &settings, m, recipients, message, stop)
                    .await
            }
            RouteAction::Mx {
                port,
                tls,
                verify_certificates,
                ca_file,
            } => {
                let trust = (*verify_certificates, ca_file.as_deref());
                let settings = match self.hop_settings(config, *tls, trust, None) {
                    Ok(s) => s,
                    Err(reply) => return deferred_locally(recipients, reply),
                };
                let mut results = Vec::new();
                for (domain, recipients) in by_domain(recipients) {
                    if stop.is_cancelled() {
                        break;
                    }
                    let found = match domain.literal() {
                        // RFC 5321 §5.1: an address literal is the host.
                        Some(ip) => Ok(vec![mx::Exchanger {
                            name: ip.to_string(),
                            addresses: vec![ip],
                        }]),
                        None => {
                            self.resolver
                                .exchangers(&config.delivery.dns_servers, &domain.normalized())
                                .await
                        }
                    };
                    let exchangers = match found {
                        Ok(x) => x,
                        Err(e) => {
                            let (result, state) = match e {
                                MxError::Permanent(reply) => (
                                    "failed",
                                    RecipientState::Failed {
                                        reply,
                                        next_hop: None,
                                    },
                                ),
                                MxError::Temporary(reply) => {
                                    ("deferred", RecipientState::Deferred { reply })
                                }
                            };
                            counter!(metric::DELIVERY_ATTEMPTS, "result" => result).increment(1);
                            info!(%domain, ?state, "no mail exchanger");
                            results.extend(each(&recipients, state));
                            continue;
                        }
                    };
                    let hops: Vec<(NextHop, Vec<IpAddr>)> = exchangers
                        .into_iter()
                        .map(|x| {
                            let hop = NextHop {
                                host: x.name,
                                port: *port,
                            };
                            (hop, x.addresses)
                        })
                        .collect();
                    let targets: Vec<Target<'_>> = hops
                        .iter()
                        .flat_map(|(hop, addresses)| {
                            addresses.iter().map(move |ip| Target {
                                hop,
                                address: Some(*ip),
                            })
                        })
                        .collect();
                    results.extend(
                        self.relay(config, &targets, &settings, m, &recipients, message, stop)
                            .await,
                    );
                }
                results
            }
        }
    }

    /// How to talk to a route's hops. `trust`: whether certificates are
    /// verified, and against which CA file (the web PKI's roots without
    /// one). The file was checked when the config was loaded; one gone or
    /// spoiled since is a local problem: `Err` with the reply that defers.
    fn hop_settings<'a>(
        &'a self,
        config: &ClusterConfig,
        tls: TlsPolicy,
        trust: (bool, Option<&'a std::path::Path>),
        auth: Option<&'a (String, String)>,
    ) -> Result<client::HopSettings<'a>, String> {
        let verify = match trust {
            (false, _) => Verify::Off,
            (true, None) => Verify::WebPki,
            (true, Some(path)) => {
                Verify::ca_file(path).map_err(|e| format!("451 4.3.0 ca_file {e}"))?
            }
        };
        Ok(client::HopSettings {
            helo: &self.core.options.hostname,
            tls,
            verify,
            ca_file: trust.1,
            auth,
            connect_timeout: config.delivery.connect_timeout,
            command_timeout: config.delivery.command_timeout,
        })
    }

    /// One transaction with the first of `targets` that answers; the next
    /// one is tried only when a hop cannot be reached or fails mid-session.
    /// `stop` ends it before the next target, or while waiting for or
    /// connecting to one (the recipients get no new state), never once
    /// the message is on its way.
    #[allow(clippy::too_many_arguments)]
    async fn relay(
        &self,
        config: &ClusterConfig,
        targets: &[Target<'_>],
        settings: &client::HopSettings<'_>,
        m: &SpooledMessage,
        recipients: &[Mailbox],
        message: &Body,
        stop: &CancellationToken,
    ) -> Vec<(Mailbox, RecipientState)> {
        let tx = client::Transaction {
            mail_from: &m.envelope.mail_from,
            recipients,
            message,
            body_8bit: m.envelope.body_8bit,
            smtputf8: m.envelope.smtputf8,
        };
        let mut last_error = String::from("no next hop");
        let max_per_hop = config.delivery.max_connections_per_hop as usize;
        for target in targets {
            let hop = target.label();
            match self
                .sessions
                .deliver(target, settings, max_per_hop, &tx, stop)
                .await
            {
                Ok(None) => {
                    info!(next_hop = %hop, "stopped before sending, for an administrator's operation");
                    return Vec::new();
                }
                Ok(Some(outcomes)) => {
                    return recipients
                        .iter()
                        .cloned()
                        .zip(outcomes)
                        .map(|(r, o)| {
                            let state = outcome_state(&hop, o);
                            let result = match &state {
                                RecipientState::Delivered { .. } => "delivered",
                                RecipientState::Failed { .. } => "failed",
                                _ => "deferred",
                            };
                            counter!(metric::DELIVERY_ATTEMPTS, "result" => result).increment(1);
                            info!(next_hop = %hop, recipient = %r, ?state, "delivery attempt");
                            (r, state)
                        })
                        .collect();
                }
                Err(e) if e.is_permanent() => {
                    counter!(metric::DELIVERY_ATTEMPTS, "result" => "failed").increment(1);
                    info!(next_hop = %hop, error = %e, "message refused");
                    let reply = match &e {
                        HopError::Refused { reply, .. } => reply.to_string(),
                        other => other.to_string(),
                    };
                    return each(
                        recipients,
                        RecipientState::Failed {
                            reply,
                            next_hop: Some(hop),
                        },
                    );
                }
                Err(e) => {
                    info!(next_hop = %hop, error = %e, "next hop failed; trying the next one");
                    last_error = e.to_string();
                }
            }
        }
        counter!(metric::DELIVERY_ATTEMPTS, "result" => "deferred").increment(1);
        each(
            recipients,
            RecipientState::Deferred {
                reply: format!("451 4.4.0 {last_error}"),
            },
        )
    }

    fn track(&self, m: &SpooledMessage, address: &Mailbox, state: &RecipientState, attempt: u32) {
        let (event, next_hop, reply) = match state {
            RecipientState::Delivered { next_hop, reply } => {
                ("delivered", Some(next_hop.as_str()), Some(reply.as_str()))
            }
            RecipientState::Deferred { reply } => ("deferred", None, Some(reply.as_str())),
            RecipientState::Failed { reply, next_hop } => {
                ("failed", next_hop.as_deref(), Some(reply.as_str()))
            }
            RecipientState::Queued => return,
        };
        let mut e = TrackingEvent::new(event, &m.id, &m.envelope);
        e.recipients = vec![address];
        e.next_hop = next_hop;
        e.reply = reply;
        e.attempt = Some(attempt);
        self.core.tracking.record(&e);
    }

    /// Expiry, reports to the sender, and the new state on disk.
    pub(crate) async fn conclude(
        &self,
        config: &ClusterConfig,
        m: &SpooledMessage,
        mut state: DeliveryState,
        message: &Body,
    ) -> Option<i64> {
        let d = &config.delivery;
        let now = unix_now();
        let age = Duration::from_secs(u64::try_from(now - m.envelope.received_at).unwrap_or(0));
        if age >= d.bounce_after {
            for r in state.recipients.iter_mut().filter(|r| r.state.is_pending()) {
                let last = match &r.state {
                    RecipientState::Deferred { reply } => format!("; last error: {reply}"),
                    _ => String::new(),
                };
                r.state = RecipientState::Failed {
                    reply: format!("4.4.7 Message expired after {age:?}{last}"),
                    next_hop: None,
                };
                let mut e = TrackingEvent::new("expired", &m.id, &m.envelope);
                e.recipients = vec![&r.address];
                self.core.tracking.record(&e);
            }
        }
        let has_sender = !m.envelope.mail_from.is_null();
        // Recipients that failed in this attempt are reported now, not when
        // the last deferred one is settled (as Exchange does).
        let failed_now = reported(&state, |s| matches!(s, RecipientState::Failed { .. }))
            .into_iter()
            .filter(|r| {
                m.state
                    .recipients
                    .iter()
                    .any(|before| before.address == r.address && before.state.is_pending())
            })
            .collect::<Vec<_>>();
        if !failed_now.is_empty() && has_sender {
            self.report(ReportKind::Failed, m, &failed_now, message)
                .await;
        }
        if state.is_finished() {
            if let Err(e) = self.journal.retire(&m.id).await {
                warn!(error = %e, "cannot retire a finished message; it may be tried again");
            }
            info!(attempts = state.attempts, "message done");
            return None;
        }
        if !state.delay_notified && age >= d.delay_notice_after && has_sender {
            let delayed = reported(&state, RecipientState::is_pending);
            self.report(ReportKind::Delayed, m, &delayed, message).await;
            state.delay_notified = true;
        }
        let base = d.retry_interval.as_secs_f64();
        let jitter = base * 0.1 * rand::random::<f64>();
        state.next_attempt = now + (base + jitter).ceil() as i64;
        if let Err(e) = self.journal.record_state(&m.id, &state).await {
            warn!(error = %e, "cannot record the delivery state");
        }
        Some(state.next_attempt)
    }

    /// Queues a DSN to the sender of `m`.
    async fn report(
        &self,
        kind: ReportKind,
        m: &SpooledMessage,
        recipients: &[ReportedRecipient],
        message: &Body,
    ) {
        let Some(sender) = m.envelope.mail_from.mailbox() else {
            return;
        };
        // Only the header section goes into a report.
        let message = match message.header().await {
            Ok(h) => h,
            Err(e) => {
                warn!(error = %e, "cannot read the message's header for a report; sent without");
                Vec::new()
            }
        };
        let hostname = &self.core.options.hostname;
        let id = QueueId::new();
        let now = chrono::Utc::now();
        let body = dsn::render(&Report {
            kind,
            reporting_mta: hostname,
            original: &m.envelope,
            original_id: m.id.as_str(),
            original_message: &message,
            recipients,
            date: &now.to_rfc2822(),
            unique: id.as_str(),
        });
        let envelope = StoredEnvelope {
            mail_from: ReversePath::Null,
            rcpt_to: vec![sender.clone()],
            client_ip: "127.0.0.1".into(),
            helo: hostname.clone(),
            connector: "(delivery status notification)".into(),
            user: None,
            received_at: now.timestamp(),
            body_8bit: false,
            smtputf8: m.envelope.smtputf8,
            session_id: String::new(),
            // As dsn::render writes it, so the DSN's own tracking events
            // carry it too.
            message_id: Some(format!("<{id}@{hostname}>")),
        };
        let what = match kind {
            ReportKind::Failed => "bounce",
            ReportKind::Delayed => "delay notice",
        };
        match self.journal.store(id.clone(), envelope, body).await {
            Ok(_) => {
                info!(dsn = %id, to = %m.envelope.mail_from, "{what} queued");
                let event = match kind {
                    ReportKind::Failed => "bounced",
                    ReportKind::Delayed => "delay_notified",
                };
                let mut e = TrackingEvent::new(event, &m.id, &m.envelope);
                e.recipients = recipients.iter().map(|r| &r.address).collect();
                e.dsn_queue_id = Some(id.as_str());
                self.core.tracking.record(&e);
            }
            Err(e) => warn!(error = %e, "cannot queue the {what}"),
        }
    }
}

fn route_path(route: &Route) -> String {
    match &route.action {
        RouteAction::Directory(p) => p.display().to_string(),
        RouteAction::Smtp { .. } | RouteAction::Mx { .. } => String::new(),
    }
}

fn outcome_state(hop: &str, o: RecipientOutcome) -> RecipientState {
    match o {
        RecipientOutcome::Delivered(reply) => RecipientState::Delivered {
            next_hop: hop.to_string(),
            reply,
        },
        RecipientOutcome::Temporary(reply) => RecipientState::Deferred { reply },
        RecipientOutcome::Permanent(reply) => RecipientState::Failed {
            reply,
            next_hop: Some(hop.to_string()),
        },
    }
}

/// The recipients whose state passes `pick`, as a report lists them.
fn reported(
    state: &DeliveryState,
    pick: impl Fn(&RecipientState) -> bool,
) -> Vec<ReportedRecipient> {
    state
        .recipients
        .iter()
        .filter(|r| pick(&r.state))
        .map(|r| {
            let (reply, hop) = match &r.state {
                RecipientState::Failed { reply, next_hop } => (reply.clone(), next_hop.clone()),
                RecipientState::Deferred { reply } => (reply.clone(), None),
                RecipientState::Delivered { reply, next_hop } => {
                    (reply.clone(), Some(next_hop.clone()))
                }
                RecipientState::Queued => ("not yet tried".to_string(), None),
            };
            let fallback = if matches!(r.state, RecipientState::Failed { .. }) {
                "5.0.0"
            } else {
                "4.0.0"
            };
            let status = reply
                .split_whitespace()
                .find(|w| ferry_smtp::client::is_enhanced_code(w))
                .unwrap_or(fallback)
                .to_string();
            ReportedRecipient {
                address: r.address.clone(),
                status,
                diagnostic: reply,
                // `host:port`, or `name[address]:port` for MX: the name.
                remote_mta: hop.map(|h| {
                    let host = h.rsplit_once(':').map_or(h.as_str(), |(host, _)| host);
                    match host.split_once('[') {
                        Some((name, _)) if !name.is_empty() => name.to_string(),
                        _ => host.to_string(),
                    }
                }),
            }
        })
        .collect()
}

/// Each of `recipients` deferred for a local problem (`reply`), logged.
fn deferred_locally(recipients: &[Mailbox], reply: String) -> Vec<(Mailbox, RecipientState)> {
    counter!(metric::DELIVERY_ATTEMPTS, "result" => "deferred").increment(1);
    warn!(%reply, "cannot set up delivery on this route; deferred");
    each(recipients, RecipientState::Deferred { reply })
}

/// The same state for each of `recipients`.
fn each(recipients: &[Mailbox], state: RecipientState) -> Vec<(Mailbox, RecipientState)> {
    recipients
        .iter()
        .map(|r| (r.clone(), state.clone()))
        .collect()
}

/// Recipients grouped by domain (compared as [`Domain::normalized`]), in
/// first-seen order.
fn by_domain(recipients: &[Mailbox]) -> Vec<(Domain, Vec<Mailbox>)> {
    let mut groups: Vec<(Domain, Vec<Mailbox>)> = Vec::new();
    for r in recipients {
        let domain = r.domain();
        match groups
            .iter_mut()
            .find(|(d, _)| d.normalized() == domain.normalized())
        {
            Some((_, list)) => list.push(r.clone()),
            None => groups.push((domain.clone(), vec![r.clone()])),
        }
    }
    groups
}
