//! `outpost-bench forward`.

use super::*;

pub async fn run(args: ForwardArgs, config: Config) -> anyhow::Result<()> {
    use outpost::central::{Connector, schema as central_schema};
    use outpost::config::{NotifyMode, TlsMode};
    use outpost::forward::service::Central;
    use outpost::forward::{ForwardStatus, Forwarder, Uplink};

    let mut central = config.central.clone();
    central.url = Some(args.url.clone());
    if central.tls == TlsMode::Prefer && args.url.contains("127.0.0.1") {
        central.tls = TlsMode::Disable;
    }
    let connector = Connector::new(&central)?;
    let mut admin = Central::open(&connector).await.context("connecting to the bench database")?;
    for t in ["benchraw", "benchfwd", "benchtrig_none", "benchtrig_per_row", "benchtrig_per_batch"] {
        admin.client_mut().batch_execute(&format!("DROP SCHEMA IF EXISTS tenant_{t} CASCADE")).await?;
    }
    let dir = config.site.data_dir.join(format!("bench-forward-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let log_path = dir.join("site-log.sqlite");
    let payload = payload(0, args.payload_bytes);

    // 1. The backlog: `rows` pending events in a fresh site log.
    let started = Instant::now();
    {
        let (path, payload, n) = (log_path.clone(), payload.clone(), args.rows);
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let mut conn = log::open_and_migrate(&path)?;
            let mut last = schema::seq_high(&conn)?;
            for chunk in (0..n).collect::<Vec<_>>().chunks(10_000) {
                let tx = conn.transaction()?;
                for i in chunk {
                    schema::insert_event(&tx, &synthetic("benchfwd", *i, &payload), None, &mut last)?;
                }
                tx.commit()?;
            }
            Ok(())
        })
        .await??;
    }
    println!("backlog: {} events written to a scratch site log in {:.1}s", args.rows, started.elapsed().as_secs_f64());

    // 2. Raw limit: the same rows, already in memory, COPY + INSERT … ON CONFLICT
    //    in central.batch_rows batches, one transaction each.
    let rows = {
        let p = log_path.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<outpost::event::StoredEvent>> {
            Ok(schema::all_events(&log::open(&p, true)?)?)
        })
        .await??
    };
    let layout = |notify| central_schema::Layout {
        notify,
        interval: outpost::config::PartitionInterval::Month,
        partition_existing: false,
        retention: None,
    };
    central_schema::migrate_tenant(admin.client_mut(), "benchraw", layout(NotifyMode::PerBatch)).await?;
    let started = Instant::now();
    for chunk in rows.chunks(central.batch_rows) {
        let refs: Vec<&outpost::event::StoredEvent> = chunk.iter().collect();
        admin.write("tenant_benchraw", &refs).await?;
    }
    let raw_rate = rows.len() as f64 / started.elapsed().as_secs_f64();
    println!(
        "raw COPY BINARY + INSERT ON CONFLICT (per_batch trigger, {}-row transactions): {raw_rate:.0} rows/s",
        central.batch_rows
    );
    drop(rows);

    // 3. The forwarder draining the backlog from the site log.
    let metrics = Arc::new(outpost::metrics::Metrics::new());
    let conn = log::open_and_migrate(&log_path)?;
    let wake = Arc::new(tokio::sync::Notify::new());
    let (handle, writer) = log::writer::spawn(
        conn,
        log::WriterConfig {
            max_bytes: u64::MAX,
            remote_max_bytes: u64::MAX,
            site_id: "bench-site".into(),
            commit_max_rows: 10_000,
            commit_delay: Duration::ZERO,
            commit_max_bytes: 64 << 20,
            queue_capacity: 64,
            write_budget: 0,
            max_commit_delay: Duration::ZERO,
        },
        metrics.clone(),
        wake.clone(),
        Vec::new(),
    )?;
    let readers = log::Readers::new(log_path.clone());
    central.notify = NotifyMode::PerBatch;
    central.batch_wait = Duration::ZERO;
    let forwarder = Forwarder {
        connector: connector.clone(),
        config: central.clone(),
        log: handle,
        readers: readers.clone(),
        status: Arc::new(ForwardStatus::new(Uplink::Connecting)),
        metrics,
        wake,
        site_id: "bench-site".into(),
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let started = Instant::now();
    let task = tokio::spawn({
        let s = stop.clone();
        async move { forwarder.run(s).await }
    });
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if !readers.with(log::schema::has_pending).await? {
            break;
        }
    }
    let drain_rate = args.rows as f64 / started.elapsed().as_secs_f64();
    stop.cancel();
    task.await??;
    tokio::task::spawn_blocking(move || writer.join()).await?;
    println!(
        "forwarder drain of {} events (site log → central, marked forwarded): {drain_rate:.0} rows/s = {:.1}% of raw",
        args.rows,
        100.0 * drain_rate / raw_rate
    );

    // 4. Trigger cost: the same insert path with no trigger, per_row, per_batch.
    let sample: Vec<outpost::event::StoredEvent> = {
        let p = log_path.clone();
        let n = args.trigger_rows;
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let conn = log::open(&p, true)?;
            Ok(schema::all_events(&conn)?.into_iter().take(n).collect())
        })
        .await??
    };
    // Interleaved rounds on fresh tables (a resend would insert nothing and
    // fire no row trigger); the best round of each style counts.
    let modes = [("none", None), ("per_row", Some(NotifyMode::PerRow)), ("per_batch", Some(NotifyMode::PerBatch))];
    let mut rates = [0f64; 3];
    for round in 0..3 {
        for (i, (name, mode)) in modes.iter().enumerate() {
            let tenant = format!("benchtrig_{name}");
            admin.client_mut().batch_execute(&format!("DROP SCHEMA IF EXISTS tenant_{tenant} CASCADE")).await?;
            central_schema::migrate_tenant(admin.client_mut(), &tenant, layout(mode.unwrap_or(NotifyMode::PerBatch)))
                .await?;
            if mode.is_none() {
                admin
                    .client_mut()
                    .batch_execute(&format!("DROP TRIGGER events_notify_batch ON tenant_{tenant}.events"))
                    .await?;
            }
            admin.client_mut().batch_execute("CHECKPOINT").await?;
            let started = Instant::now();
            for chunk in sample.chunks(central.batch_rows) {
                let refs: Vec<&outpost::event::StoredEvent> = chunk.iter().collect();
                admin.write(&format!("tenant_{tenant}"), &refs).await?;
            }
            let rate = sample.len() as f64 / started.elapsed().as_secs_f64();
            println!("trigger {name:<9} round {round}: {rate:.0} rows/s");
            rates[i] = rates[i].max(rate);
        }
    }
    println!(
        "trigger best of 3 ({} rows, {}-row transactions): none {:.0}, per_row {:.0}, per_batch {:.0} rows/s",
        sample.len(),
        central.batch_rows,
        rates[0],
        rates[1],
        rates[2]
    );
    println!(
        "trigger cost vs none: per_row {:.1}% slower, per_batch {:.1}% slower",
        100.0 * (1.0 - rates[1] / rates[0]),
        100.0 * (1.0 - rates[2] / rates[0])
    );
    for t in ["benchraw", "benchfwd", "benchtrig_none", "benchtrig_per_row", "benchtrig_per_batch"] {
        admin.client_mut().batch_execute(&format!("DROP SCHEMA IF EXISTS tenant_{t} CASCADE")).await?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
