//! `outpost-bench mqtt`: devices publish at QoS 0, 1 or 2 over MQTT 3.1.1 or
//! 5.0 (rumqttc; its `v5` module for 5.0). Ack latency is publish → PUBACK at
//! QoS 1 and publish → PUBCOMP at QoS 2, with publish → PUBREC alongside.
//! `--compare` runs 3.1.1 QoS 1, 3.1.1 QoS 2 and 5.0 QoS 1 one after the
//! other with the same devices and prints the ratios between them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};

use rumqttc::v5;
use tokio::task::JoinHandle;

use super::*;

/// MQTT protocol level of the bench clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    #[value(name = "3.1.1")]
    V311,
    #[value(name = "5", alias = "5.0")]
    V5,
}

impl Protocol {
    fn label(self) -> &'static str {
        match self {
            Protocol::V311 => "3.1.1",
            Protocol::V5 => "5.0",
        }
    }
}

/// One measurement: protocol level and QoS.
#[derive(Clone, Copy, Debug)]
struct Cell {
    protocol: Protocol,
    qos: u8,
}

impl std::fmt::Display for Cell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} QoS {}", self.protocol.label(), self.qos)
    }
}

/// `--compare`, in run order: the baseline, then the two it is compared with.
const COMPARE: [Cell; 3] = [
    Cell { protocol: Protocol::V311, qos: 1 },
    Cell { protocol: Protocol::V311, qos: 2 },
    Cell { protocol: Protocol::V5, qos: 1 },
];

pub async fn run(args: MqttArgs, config: Config) -> anyhow::Result<()> {
    if args.devices == 0 {
        bail!("--devices must be at least 1");
    }
    let rate = parse_rate(&args.rate)?;
    let devices: Vec<(String, Option<String>)> = if args.plain {
        (0..args.devices).map(|i| (format!("bench-{i}"), None)).collect()
    } else {
        let admin = admin_token(args.admin_token.clone(), &config)?;
        let client = reqwest::Client::new();
        register_devices(&client, args.url.trim_end_matches('/'), &args.tenant, &admin, args.devices)
            .await?
            .into_iter()
            .map(|(id, t)| (id, Some(t)))
            .collect()
    };
    let cells = if args.compare { COMPARE.to_vec() } else { vec![Cell { protocol: args.protocol, qos: args.qos }] };
    println!(
        "bench mqtt: {} devices, rate {}, {}, inflight {}, payload ~{} B, {:?}{} against {}:{}{}",
        args.devices,
        rate.map_or("max".into(), |r| format!("{r}/s")),
        cells.iter().map(Cell::to_string).collect::<Vec<_>>().join(", "),
        args.inflight,
        args.payload_bytes,
        args.duration,
        match (cells.len(), args.rounds) {
            (1, 1) => String::new(),
            (_, 1) => " each".into(),
            (_, r) => format!(" each × {r} rounds"),
        },
        args.host,
        args.port,
        if args.plain { " (plain broker)" } else { "" }
    );
    // What the appliance writes to storage over the whole run (not a plain broker).
    let metrics =
        if args.plain { None } else { Some((reqwest::Client::new(), admin_token(args.admin_token.clone(), &config)?)) };
    let base = args.url.trim_end_matches('/').to_string();
    let wear_before = match &metrics {
        Some((client, admin)) => Some(Wear::read(client, &base, admin).await?),
        None => None,
    };
    // Per cell: the merged counts and the summed time of its runs.
    let mut totals: Vec<(Counts, Duration)> = cells.iter().map(|_| Default::default()).collect();
    for round in 1..=args.rounds {
        for (i, (cell, total)) in cells.iter().zip(&mut totals).enumerate() {
            if round > 1 || i > 0 {
                // Let the previous run's connections close before the next connects.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let (counts, elapsed) = drive(&args, *cell, &devices, rate).await?;
            if args.rounds > 1 {
                print!("round {round}: ");
            }
            Outcome::new(*cell, counts.clone(), elapsed).print();
            total.0.merge(counts);
            total.1 += elapsed;
        }
    }
    let outcomes: Vec<Outcome> =
        cells.iter().zip(totals).map(|(cell, (counts, elapsed))| Outcome::new(*cell, counts, elapsed)).collect();
    if args.rounds > 1 {
        println!("over all {} rounds:", args.rounds);
        outcomes.iter().for_each(Outcome::print);
    }
    let wear = match &metrics {
        Some((client, admin)) => Some(Wear::settled(client, &base, admin).await?),
        None => None,
    };
    let raw = if args.no_raw { None } else { Some(RawLimit::measure(&config, args.payload_bytes).await?) };
    if let (Some(before), Some(after)) = (wear_before, wear) {
        // A device's publishes commit in groups much as a batch does.
        after.print_since(&before, raw.as_ref(), 100);
    }
    if args.compare {
        print_table(&outcomes, raw.as_ref());
    }
    if let Some(raw) = raw {
        raw.print();
        // --compare: the baseline (3.1.1 QoS 1); the table has every cell.
        raw.print_ratio(outcomes[0].rate);
    }
    Ok(())
}

/// Runs one cell: every device connects, publishes until `--duration` has
/// passed, and its acks are tallied until they are in (or 5 s more). The
/// counts, and the time from the start to the last completed flow (so the
/// acks of the last window are not credited to `--duration` alone).
async fn drive(
    args: &MqttArgs,
    cell: Cell,
    devices: &[(String, Option<String>)],
    rate: Option<f64>,
) -> anyhow::Result<(Counts, Duration)> {
    let started = Instant::now();
    let cpu_before = cpu_time();
    let deadline = started + args.duration;
    let interval = rate.map(|r| Duration::from_secs_f64(args.devices as f64 / r));
    let mut tasks = Vec::with_capacity(devices.len());
    let n = devices.len();
    for (i, (id, token)) in devices.iter().enumerate() {
        let (client, conn) = connect(cell.protocol, id, token.as_deref(), args);
        let topic = format!("{}/devices/{id}/events/bench.reading", args.tenant);
        let body = payload(0, args.payload_bytes);
        // Publishes queued and not yet acked (or refused).
        let outstanding = Arc::new(AtomicI64::new(0));
        let unacked = outstanding.clone();
        let publisher = tokio::spawn(async move {
            let mut tick = interval.map(|every| paced(every, i, n));
            while Instant::now() < deadline {
                if let Some(t) = tick.as_mut() {
                    t.tick().await;
                }
                if !client.publish(&topic, cell.qos, &body).await {
                    break;
                }
                unacked.fetch_add(1, Ordering::Relaxed);
            }
            // The last window's acks before DISCONNECT ends the session (the
            // server drops what it has not answered yet).
            let drained_by = Instant::now() + Duration::from_secs(4);
            while unacked.load(Ordering::Relaxed) > 0 && Instant::now() < drained_by {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            client.disconnect().await;
        });
        let early = started + EARLY;
        tasks.push(tokio::spawn(tally(conn, publisher, outstanding, cell.qos, deadline, early)));
    }
    let mut all = Counts::default();
    for t in tasks {
        all.merge(t.await?);
    }
    all.client_cpu = cpu_time().zip(cpu_before).map_or(Duration::ZERO, |(after, before)| after - before);
    let elapsed = all.last_ack.map_or(args.duration, |t| t - started);
    Ok((all, elapsed))
}

/// The publishing half of a device's connection, either protocol.
enum Client {
    V311(rumqttc::AsyncClient),
    V5(v5::AsyncClient),
}

/// The event loop of a device's connection, either protocol (boxed: both
/// are large, and of different sizes).
enum Conn {
    V311(Box<rumqttc::EventLoop>),
    V5(Box<v5::EventLoop>),
}

fn connect(protocol: Protocol, id: &str, token: Option<&str>, args: &MqttArgs) -> (Client, Conn) {
    let keep_alive = Duration::from_secs(30);
    let cap = usize::from(args.inflight) * 2;
    match protocol {
        Protocol::V311 => {
            let mut o = rumqttc::MqttOptions::new(id, args.host.clone(), args.port);
            if let Some(t) = token {
                o.set_credentials(id, t);
            }
            o.set_keep_alive(keep_alive);
            o.set_inflight(args.inflight);
            o.set_max_packet_size(1 << 20, 1 << 20);
            let (client, el) = rumqttc::AsyncClient::new(o, cap);
            (Client::V311(client), Conn::V311(Box::new(el)))
        }
        Protocol::V5 => {
            let mut o = v5::MqttOptions::new(id, args.host.clone(), args.port);
            if let Some(t) = token {
                o.set_credentials(id, t);
            }
            o.set_keep_alive(keep_alive);
            // The window is the smaller of this and the server's Receive Maximum.
            o.set_outgoing_inflight_upper_limit(args.inflight);
            o.set_max_packet_size(Some(1 << 20));
            let (client, el) = v5::AsyncClient::new(o, cap);
            (Client::V5(client), Conn::V5(Box::new(el)))
        }
    }
}

impl Client {
    /// Queues a publish; false once the event loop is gone.
    async fn publish(&self, topic: &str, qos: u8, body: &str) -> bool {
        match self {
            Client::V311(c) => {
                let qos = rumqttc::qos(qos).expect("--qos is 0, 1 or 2");
                c.publish(topic, qos, false, body.to_owned()).await.is_ok()
            }
            Client::V5(c) => {
                let qos = v5::mqttbytes::qos(qos).expect("--qos is 0, 1 or 2");
                c.publish(topic, qos, false, body.to_owned()).await.is_ok()
            }
        }
    }

    async fn disconnect(&self) {
        // An event loop already gone has nothing to disconnect.
        let _gone = match self {
            Client::V311(c) => c.disconnect().await.is_err(),
            Client::V5(c) => c.disconnect().await.is_err(),
        };
    }
}

/// What the tally needs from an event of either protocol's event loop.
enum Step {
    /// A publish went out with this packet id (0 at QoS 0).
    Sent(u16),
    /// PUBACK; false: a 5.0 reason code ≥ 0x80 (refused).
    PubAck(u16, bool),
    /// PUBREC; false: a 5.0 reason code ≥ 0x80 (refused, no PUBREL follows).
    PubRec(u16, bool),
    PubComp(u16),
    Disconnected,
    Other,
}

impl Conn {
    async fn next(&mut self) -> Result<Step, String> {
        match self {
            Conn::V311(el) => {
                use rumqttc::{Event, Packet};
                Ok(match el.poll().await.map_err(|e| e.to_string())? {
                    Event::Outgoing(o) => outgoing(o),
                    Event::Incoming(Packet::PubAck(a)) => Step::PubAck(a.pkid, true),
                    Event::Incoming(Packet::PubRec(r)) => Step::PubRec(r.pkid, true),
                    Event::Incoming(Packet::PubComp(c)) => Step::PubComp(c.pkid),
                    Event::Incoming(_) => Step::Other,
                })
            }
            Conn::V5(el) => {
                use v5::Event;
                use v5::mqttbytes::v5::{Packet, PubAckReason, PubRecReason};
                Ok(match el.poll().await.map_err(|e| e.to_string())? {
                    Event::Outgoing(o) => outgoing(o),
                    Event::Incoming(Packet::PubAck(a)) => Step::PubAck(
                        a.pkid,
                        matches!(a.reason, PubAckReason::Success | PubAckReason::NoMatchingSubscribers),
                    ),
                    Event::Incoming(Packet::PubRec(r)) => Step::PubRec(
                        r.pkid,
                        matches!(r.reason, PubRecReason::Success | PubRecReason::NoMatchingSubscribers),
                    ),
                    Event::Incoming(Packet::PubComp(c)) => Step::PubComp(c.pkid),
                    Event::Incoming(_) => Step::Other,
                })
            }
        }
    }
}

fn outgoing(o: rumqttc::Outgoing) -> Step {
    match o {
        rumqttc::Outgoing::Publish(pkid) => Step::Sent(pkid),
        rumqttc::Outgoing::Disconnect => Step::Disconnected,
        _ => Step::Other,
    }
}

/// The start of a run reported on its own: every device connects in it.
const EARLY: Duration = Duration::from_secs(5);

/// One device's (or, merged, one cell's) acks.
#[derive(Default, Clone)]
struct Counts {
    /// µs publish → PUBACK (QoS 1) or → PUBCOMP (QoS 2).
    ack_us: Vec<u32>,
    /// The same, of publishes sent before `early_until` (the first
    /// `EARLY` of the run: every device has just connected).
    early_us: Vec<u32>,
    early_until: Option<Instant>,
    /// µs publish → PUBREC (QoS 2).
    rec_us: Vec<u32>,
    /// Completed flows (QoS 0: publishes written).
    acked: u64,
    /// Refused with a 5.0 reason code (3.1.1 has none: the server closes).
    rejected: u64,
    errors: u64,
    first_error: Option<String>,
    last_ack: Option<Instant>,
    /// CPU time of this whole process (all devices) over the run.
    client_cpu: Duration,
}

impl Counts {
    fn completed(&mut self, sent_at: Option<Instant>) {
        let now = Instant::now();
        if let Some(t) = sent_at {
            self.ack_us.push(micros(now - t));
            if self.early_until.is_some_and(|e| t < e) {
                self.early_us.push(micros(now - t));
            }
        }
        self.acked += 1;
        self.last_ack = Some(now);
    }

    fn merge(&mut self, other: Counts) {
        self.ack_us.extend(other.ack_us);
        self.early_us.extend(other.early_us);
        self.rec_us.extend(other.rec_us);
        self.acked += other.acked;
        self.rejected += other.rejected;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.last_ack = self.last_ack.max(other.last_ack);
        self.client_cpu += other.client_cpu;
    }
}

/// CPU time (user + system) this process has used, from /proc/self/stat
/// (utime and stime, in USER_HZ = 100 ticks/s on Linux). The client shares
/// the machine with the appliance, so its cost per event is part of the story.
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields 14 and 15; counted after the command name's ")" (field 2), 11 and 12.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// Reads a device's event loop until its publisher has disconnected (or 5 s
/// past the deadline), matching acks to the publishes by packet id.
async fn tally(
    mut conn: Conn,
    publisher: JoinHandle<()>,
    outstanding: Arc<AtomicI64>,
    qos: u8,
    deadline: Instant,
    early_until: Instant,
) -> Counts {
    let mut sent: HashMap<u16, Instant> = HashMap::new();
    let mut c = Counts { early_until: Some(early_until), ..Counts::default() };
    let stop = deadline + Duration::from_secs(5);
    // rumqttc's poll is not cancel-safe while it connects: a timeout there
    // drops a connection whose CONNECT the server may take after the retry's,
    // and that stale one then takes the session over. Connecting gets long.
    let mut connecting = true;
    while Instant::now() < stop {
        let settled = c.acked + c.rejected;
        let wait = Duration::from_secs(if connecting { 30 } else { 1 });
        let step = tokio::time::timeout(wait, conn.next()).await;
        connecting = matches!(step, Ok(Err(_)));
        match step {
            Ok(Ok(Step::Sent(_))) if qos == 0 => c.completed(None),
            Ok(Ok(Step::Sent(pkid))) => {
                sent.insert(pkid, Instant::now());
            }
            Ok(Ok(Step::PubAck(pkid, ok))) => {
                if let Some(t) = sent.remove(&pkid) {
                    if ok { c.completed(Some(t)) } else { c.rejected += 1 }
                }
            }
            Ok(Ok(Step::PubRec(pkid, true))) => {
                if let Some(t) = sent.get(&pkid) {
                    c.rec_us.push(micros(t.elapsed()));
                }
            }
            Ok(Ok(Step::PubRec(pkid, false))) => {
                if sent.remove(&pkid).is_some() {
                    c.rejected += 1;
                }
            }
            Ok(Ok(Step::PubComp(pkid))) => {
                if let Some(t) = sent.remove(&pkid) {
                    c.completed(Some(t));
                }
            }
            Ok(Ok(Step::Disconnected)) => break,
            Ok(Ok(Step::Other)) => {}
            Ok(Err(e)) => {
                c.errors += 1;
                c.first_error.get_or_insert(e);
                if Instant::now() > deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(_) if Instant::now() > deadline => break,
            Err(_) => {}
        }
        let newly = c.acked + c.rejected - settled;
        if newly > 0 {
            outstanding.fetch_sub(newly as i64, Ordering::Relaxed);
        }
    }
    // Without its event loop a publisher stuck on a full request queue fails
    // instead of waiting forever.
    drop(conn);
    let _ = publisher.await;
    c
}

/// What one cell measured.
struct Outcome {
    cell: Cell,
    acked: u64,
    rejected: u64,
    errors: u64,
    first_error: Option<String>,
    /// Seconds from the start to the last completed flow, summed over runs.
    elapsed: f64,
    /// Completed flows per second.
    rate: f64,
    /// Bench client CPU per completed flow, µs.
    client_us: f64,
    /// p50, p99, max (ms) and count: PUBACK/PUBCOMP, PUBREC.
    ack: (f64, f64, f64, usize),
    /// PUBACK/PUBCOMP of the publishes sent in the first `EARLY`.
    early: (f64, f64, f64, usize),
    rec: (f64, f64, f64, usize),
}

impl Outcome {
    fn new(cell: Cell, c: Counts, elapsed: Duration) -> Outcome {
        let elapsed = elapsed.as_secs_f64().max(1e-3);
        Outcome {
            cell,
            acked: c.acked,
            rejected: c.rejected,
            errors: c.errors,
            first_error: c.first_error,
            elapsed,
            rate: c.acked as f64 / elapsed,
            client_us: c.client_cpu.as_secs_f64() * 1e6 / c.acked.max(1) as f64,
            ack: percentiles(c.ack_us),
            early: percentiles(c.early_us),
            rec: percentiles(c.rec_us),
        }
    }

    /// PUBACK, PUBCOMP, or nothing at QoS 0.
    fn ack_name(&self) -> Option<&'static str> {
        match self.cell.qos {
            1 => Some("PUBACK"),
            2 => Some("PUBCOMP"),
            _ => None,
        }
    }

    fn print(&self) {
        println!(
            "{}: acked {} publishes in {:.1}s = {:.0} events/s (bench client CPU {:.1} µs/event); refused {}; connection errors {}{}",
            self.cell,
            self.acked,
            self.elapsed,
            self.rate,
            self.client_us,
            self.rejected,
            self.errors,
            self.first_error.as_ref().map_or(String::new(), |e| format!(" (first: {e})"))
        );
        if self.cell.qos == 2 {
            print_latency("PUBREC", self.rec);
        }
        if let Some(name) = self.ack_name() {
            print_latency(name, self.ack);
            print_latency(&format!("{name} (sent in the first {}s, with the connects)", EARLY.as_secs()), self.early);
        }
    }
}

fn print_latency(name: &str, (p50, p99, max, n): (f64, f64, f64, usize)) {
    println!("  {name} latency: p50 {p50:.2} ms  p99 {p99:.2} ms  max {max:.2} ms  ({n} acks)");
}

/// The `--compare` table and the two ratios the targets are stated in.
fn print_table(outcomes: &[Outcome], raw: Option<&RawLimit>) {
    println!();
    println!(
        "{:<14} {:>10} {:>8} {:>9} {:>9} {:>9} {:>16} {:>8} {:>7} {:>7} {:>12}",
        "cell",
        "events/s",
        "ack",
        "p50 ms",
        "p99 ms",
        "max ms",
        "PUBREC p50/p99",
        "refused",
        "errors",
        "% raw",
        "client µs/ev"
    );
    for o in outcomes {
        let (p50, p99, max, _) = o.ack;
        let rec = if o.cell.qos == 2 { format!("{:.2}/{:.2}", o.rec.0, o.rec.1) } else { "-".into() };
        let of_raw = raw.map_or("-".into(), |r| format!("{:.1}", 100.0 * o.rate / r.best()));
        println!(
            "{:<14} {:>10.0} {:>8} {:>9.2} {:>9.2} {:>9.2} {:>16} {:>8} {:>7} {:>7} {:>12.1}",
            o.cell.to_string(),
            o.rate,
            o.ack_name().unwrap_or("-"),
            p50,
            p99,
            max,
            rec,
            o.rejected,
            o.errors,
            of_raw,
            o.client_us
        );
    }
    let [q1, q2, v5q1] = outcomes else { return };
    let ratio = |a: &Outcome, b: &Outcome| if b.rate > 0.0 { a.rate / b.rate } else { 0.0 };
    let (qos, level) = (ratio(q2, q1), ratio(v5q1, q1));
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!("QoS 2 / QoS 1 (3.1.1): {qos:.2}  (target ≥ 0.50: {})", verdict(qos >= 0.5));
    println!("5.0 QoS 1 / 3.1.1 QoS 1: {level:.2}  (target 0.90–1.10: {})", verdict((0.9..=1.1).contains(&level)));
}
