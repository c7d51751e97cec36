//! Diesel with an r2d2 pool, as botserver uses it, through the router in front of four shards
//! (`hash-buckets` on a uuid `user_id`): embedded migrations run through the router (each in a transaction
//! that binds every shard), then typical queries: inserts, lookups by user, a join, counts, updates,
//! deletes and transactions. Rows are checked where they landed by connecting to the shards directly.

use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use integration::Cluster;
use uuid::Uuid;

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

mod schema {
    diesel::table! {
        users (user_id) {
            user_id -> Uuid,
            username -> Text,
            created_at -> Timestamptz,
        }
    }
    diesel::table! {
        bots (id) {
            id -> Uuid,
            name -> Text,
        }
    }
    diesel::table! {
        user_sessions (user_id, id) {
            user_id -> Uuid,
            id -> Uuid,
            bot_id -> Uuid,
            title -> Text,
            created_at -> Timestamptz,
        }
    }
    diesel::table! {
        message_history (user_id, id) {
            user_id -> Uuid,
            id -> Uuid,
            session_id -> Uuid,
            role -> Text,
            content -> Text,
            created_at -> Timestamptz,
        }
    }
    diesel::allow_tables_to_appear_in_same_query!(users, bots, user_sessions, message_history);
}

use schema::{bots, message_history, user_sessions, users};

const CONFIG: &str =
    "shard-strategy,hash\nshard-count,4\nshard-key,user_id\nshard-key-type,uuid\nshard-algorithm,hash-buckets\n\
router-auth,trust\npool-size,4\nshard-global-tables,bots,__diesel_schema_migrations\n";

#[test]
fn diesel_r2d2_migrations_and_queries() -> anyhow::Result<()> {
    let c = Cluster::start(4, CONFIG, |i, s| format!("shard-node-{i},{}\n", s.url("postgres")))?;
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", c.port);
    let pool = Pool::builder().max_size(4).build(ConnectionManager::<PgConnection>::new(&url))?;

    // Migrations through the router: every shard gets the schema and the bookkeeping row.
    let mut conn = pool.get()?;
    let applied = conn.run_pending_migrations(MIGRATIONS).map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!(applied.len(), 1);
    assert!(conn.run_pending_migrations(MIGRATIONS).map_err(|e| anyhow::anyhow!("{e}"))?.is_empty(), "idempotent");
    for s in &c.shards {
        let mut direct = PgConnection::establish(&s.url("postgres"))?;
        let n: i64 = diesel::sql_query("SELECT count(*) AS n FROM __diesel_schema_migrations")
            .get_result::<Count>(&mut direct)?
            .n;
        assert_eq!(n, 1);
        diesel::sql_query("SELECT 1 FROM message_history LIMIT 1").execute(&mut direct)?;
    }

    // A global bot, users, sessions and messages.
    let bot = Uuid::new_v4();
    diesel::insert_into(bots::table).values((bots::id.eq(bot), bots::name.eq("helper"))).execute(&mut conn)?;
    let people: Vec<Uuid> = (0..24).map(|_| Uuid::new_v4()).collect();
    for (n, u) in people.iter().enumerate() {
        diesel::insert_into(users::table)
            .values((users::user_id.eq(u), users::username.eq(format!("user{n}"))))
            .execute(&mut conn)?;
        let session = Uuid::new_v4();
        diesel::insert_into(user_sessions::table)
            .values((
                user_sessions::user_id.eq(u),
                user_sessions::id.eq(session),
                user_sessions::bot_id.eq(bot),
                user_sessions::title.eq("chat"),
            ))
            .execute(&mut conn)?;
        // A transaction per conversation turn, on the user's shard.
        conn.transaction::<_, diesel::result::Error, _>(|tx| {
            for (role, content) in [("user", "hi"), ("assistant", "hello")] {
                diesel::insert_into(message_history::table)
                    .values((
                        message_history::user_id.eq(u),
                        message_history::id.eq(Uuid::new_v4()),
                        message_history::session_id.eq(session),
                        message_history::role.eq(role),
                        message_history::content.eq(content),
                    ))
                    .execute(tx)?;
            }
            Ok(())
        })?;
    }

    // Lookups by user from several pooled connections.
    for u in &people {
        let mut conn = pool.get()?;
        let name: String = users::table.filter(users::user_id.eq(u)).select(users::username).first(&mut conn)?;
        assert!(name.starts_with("user"));
        let turns: Vec<(String, String)> = message_history::table
            .inner_join(user_sessions::table.on(user_sessions::id.eq(message_history::session_id)))
            .filter(message_history::user_id.eq(u))
            .filter(user_sessions::user_id.eq(u))
            .order(message_history::role.desc())
            .select((message_history::role, user_sessions::title))
            .load(&mut conn)?;
        assert_eq!(
            turns,
            vec![("user".to_string(), "chat".to_string()), ("assistant".to_string(), "chat".to_string())]
        );
        let bot_name: String = bots::table.filter(bots::id.eq(bot)).select(bots::name).first(&mut conn)?;
        assert_eq!(bot_name, "helper");
    }

    // A read with no key goes to every shard.
    let all: Vec<Uuid> = users::table.select(users::user_id).load(&mut conn)?;
    assert_eq!(all.len(), people.len());

    // Updates and deletes by key; a transaction that rolls back.
    let first = people[0];
    diesel::update(users::table.filter(users::user_id.eq(first)))
        .set(users::username.eq("renamed"))
        .execute(&mut conn)?;
    let r: Result<(), diesel::result::Error> = conn.transaction(|tx| {
        diesel::delete(message_history::table.filter(message_history::user_id.eq(first))).execute(tx)?;
        Err(diesel::result::Error::RollbackTransaction)
    });
    assert!(r.is_err());
    let kept: i64 = message_history::table.filter(message_history::user_id.eq(first)).count().get_result(&mut conn)?;
    assert_eq!(kept, 2);
    let gone = diesel::delete(message_history::table.filter(message_history::user_id.eq(first))).execute(&mut conn)?;
    assert_eq!(gone, 2);

    // Every user's rows are on one shard, the same for all its tables, and the shards share the load.
    let mut per_shard = Vec::new();
    for s in &c.shards {
        let mut direct = PgConnection::establish(&s.url("postgres"))?;
        let mine: Vec<Uuid> = users::table.select(users::user_id).load(&mut direct)?;
        for u in &mine {
            let elsewhere: i64 =
                user_sessions::table.filter(user_sessions::user_id.eq(u)).count().get_result(&mut direct)?;
            assert_eq!(elsewhere, 1, "the session of {u} is on its user's shard");
        }
        per_shard.push(mine.len());
    }
    assert_eq!(per_shard.iter().sum::<usize>(), people.len());
    assert!(per_shard.iter().filter(|n| **n > 0).count() >= 2, "{per_shard:?}");
    Ok(())
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}
