//! `pool-mode,session`: each client keeps its server connections; LISTEN/NOTIFY (on the first shard) and
//! session-level advisory locks work, and a client's connections are reset before another client gets them.

use std::time::Duration;

use integration::Cluster;
use tokio_postgres::AsyncMessage;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_notify_and_advisory_locks() -> anyhow::Result<()> {
    let c = Cluster::hash(2, "pool-mode,session\npool-size,4\n")?;

    // A listener whose notifications arrive on a channel.
    let (listener, mut conn) = tokio_postgres::connect(&c.conn_str(), tokio_postgres::NoTls).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(m) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            if let Ok(AsyncMessage::Notification(n)) = m {
                let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
            }
        }
    });
    listener.batch_execute("LISTEN events").await?;
    let notifier = c.client().await?;
    notifier.batch_execute("NOTIFY events, 'hello'").await?;
    let got = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await?.expect("a notification");
    assert_eq!(got, ("events".to_string(), "hello".to_string()));
    // Delivered while the listener is idle, without it sending anything.
    notifier.batch_execute("NOTIFY events, 'again'").await?;
    let got = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await?.expect("a notification");
    assert_eq!(got.1, "again");

    // A session-level advisory lock stays with its client.
    let a = c.client().await?;
    let b = c.client().await?;
    let locked: bool = a.query_one("SELECT pg_try_advisory_lock(7)", &[]).await?.get(0);
    assert!(locked);
    let other: bool = b.query_one("SELECT pg_try_advisory_lock(7)", &[]).await?.get(0);
    assert!(!other, "b cannot take a's lock");
    let released: bool = a.query_one("SELECT pg_advisory_unlock(7)", &[]).await?.get(0);
    assert!(released);
    let other: bool = b.query_one("SELECT pg_try_advisory_lock(7)", &[]).await?.get(0);
    assert!(other);

    // A client that leaves returns its connections reset: its lock and settings do not reach the next.
    b.batch_execute("SET statement_timeout = 999").await?;
    drop(b);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let d = c.client().await?;
    let free: bool = d.query_one("SELECT pg_try_advisory_lock(7)", &[]).await?.get(0);
    assert!(free, "b's lock went with b");
    let t: String = d.query_one("SHOW statement_timeout", &[]).await?.get(0);
    assert_eq!(t, "0");
    Ok(())
}
