//! Table-driven routing tests: statements a chat-bot server sends (users, bots, user_sessions,
//! message_history, usage_analytics), each with the route it must get. Two configs: bigint keys under
//! `modulo` and uuid keys under `hash-buckets`.
//!
//! Each row is `expectation | params | sql`. Expectations: `shard N` (one shard, by name), `keys V...` (the
//! shards of those key values), `all`, `any`, `session`, `err KIND`. Params are `;`-separated text values.

use std::sync::Arc;

use shardmap::sql::Cross;
use shardmap::{Config, KeyValue, Planner, RouteError, Session, ShardMap, Target, TextParams};

const BIGINT: &str = "shard-strategy,hash\nshard-count,4\nshard-key,user_id\nshard-algorithm,modulo\nshard-global-tables,bots,tools,system_config\n";
const UUID: &str = "shard-strategy,hash\nshard-count,4\nshard-key,user_id\nshard-key-type,uuid\nshard-algorithm,hash-buckets\nshard-global-tables,bots,tools\n";

const U1: &str = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";

const BIGINT_ROUTES: &str = r#"
# plain equality, literals and parameters
shard 1 | | SELECT * FROM users WHERE user_id = 12345
shard 1 | | select * from users where user_id=12345
shard 1 | | SELECT * FROM users WHERE 12345 = user_id
shard 1 | | SELECT * FROM users WHERE "user_id" = 12345
shard 1 | | SELECT * FROM public.users WHERE user_id = 12345
shard 1 | | SELECT * FROM users WHERE user_id = '12345'
shard 1 | | SELECT * FROM users WHERE user_id = 12345::bigint
shard 1 | | SELECT * FROM users WHERE user_id = CAST(12345 AS bigint)
shard 1 | | SELECT * FROM users WHERE (user_id = 12345)
shard 3 | | SELECT * FROM users WHERE user_id = -1
shard 0 | | SELECT * FROM users WHERE user_id = 0
shard 3 | | SELECT * FROM users WHERE user_id = 9223372036854775807
shard 0 | | SELECT * FROM users WHERE user_id = -9223372036854775808
shard 1 | 12345 | SELECT * FROM users WHERE user_id = $1
shard 2 | x;6 | SELECT * FROM users WHERE name = $1 AND user_id = $2
shard 1 | 12345 | SELECT * FROM users WHERE user_id = $1::int8
shard 2 | | SELECT name, email FROM users WHERE user_id = 42 LIMIT 1
shard 2 | | SELECT * FROM users WHERE user_id = 42 ORDER BY created_at DESC LIMIT 10 OFFSET 5
shard 2 | | SELECT count(*) FROM message_history WHERE user_id = 42
shard 2 | | SELECT * FROM message_history WHERE user_id = 42 AND created_at > now() - interval '1 day'
shard 2 | | SELECT * FROM message_history WHERE created_at > now() - interval '1 day' AND user_id = 42
shard 2 | | SELECT * FROM message_history WHERE user_id = 42 AND (role = 'user' OR role = 'assistant')
shard 2 | | SELECT * FROM usage_analytics WHERE user_id = 42 AND bot_id = 'b1' GROUP BY day HAVING count(*) > 1
shard 2 | | SELECT DISTINCT session_id FROM message_history WHERE user_id = 42
shard 2 | | SELECT * FROM user_sessions WHERE user_id = 42 FOR UPDATE
shard 2 | | SELECT * FROM user_sessions WHERE user_id = 42 FOR UPDATE SKIP LOCKED
shard 2 | | SELECT user_id, max(created_at) FROM message_history WHERE user_id = 42 GROUP BY user_id
shard 2 | | SELECT * FROM message_history WHERE user_id = 42 AND content ILIKE '%hello%'
shard 2 | | SELECT * FROM message_history WHERE user_id = 42 AND metadata->>'channel' = 'web'
shard 2 | | SELECT * FROM message_history WHERE user_id = 42 AND tags @> ARRAY['x']
shard 2 | | SELECT * FROM users WHERE user_id = 42 AND deleted_at IS NULL
shard 2 | | SELECT * FROM users WHERE user_id = 42 AND created_at BETWEEN '2026-01-01' AND '2026-02-01'
shard 2 | | SELECT * FROM users WHERE user_id = 42 AND NOT archived
shard 2 | | SELECT row_to_json(u) FROM users u WHERE u.user_id = 42
shard 2 | | SELECT * FROM users WHERE user_id = 42 AND email = $1
shard 2 | | EXPLAIN SELECT * FROM users WHERE user_id = 42
shard 2 | | EXPLAIN ANALYZE SELECT * FROM users WHERE user_id = 42
# qualified, aliased, joins
shard 2 | | SELECT u.name FROM users u WHERE u.user_id = 42
shard 2 | | SELECT users.name FROM users WHERE users.user_id = 42
shard 2 | | SELECT * FROM public.users AS u WHERE u.user_id = 42
shard 2 | | SELECT m.* FROM message_history m JOIN user_sessions s ON s.id = m.session_id WHERE m.user_id = 42
shard 2 | | SELECT m.* FROM message_history m JOIN user_sessions s ON s.user_id = m.user_id AND s.user_id = 42
shard 2 | | SELECT * FROM users u LEFT JOIN user_sessions s ON s.user_id = u.user_id WHERE u.user_id = 42
shard 2 | | SELECT * FROM users u INNER JOIN usage_analytics a USING (user_id) WHERE u.user_id = 42
shard 2 | | SELECT * FROM users u, user_sessions s WHERE s.user_id = u.user_id AND u.user_id = 42
shard 2 | | SELECT u.*, b.name FROM users u JOIN bots b ON b.id = u.bot_id WHERE u.user_id = 42
shard 2 | | SELECT * FROM message_history m JOIN bots b ON b.id = m.bot_id JOIN tools t ON t.bot_id = b.id WHERE m.user_id = 42
shard 2 | | SELECT * FROM (users u JOIN user_sessions s ON s.user_id = u.user_id) WHERE u.user_id = 42
# subqueries and CTEs
shard 2 | | SELECT * FROM user_sessions WHERE user_id = 42 AND id IN (SELECT session_id FROM message_history)
shard 2 | | SELECT * FROM users WHERE user_id = 42 AND EXISTS (SELECT 1 FROM message_history m WHERE m.user_id = users.user_id)
shard 2 | | SELECT * FROM (SELECT * FROM message_history) m WHERE m.user_id = 42
shard 2 | | SELECT * FROM (SELECT * FROM message_history WHERE user_id = 42) m
shard 2 | | SELECT * FROM users WHERE user_id IN (SELECT user_id FROM user_sessions WHERE user_id = 42)
shard 2 | | SELECT (SELECT count(*) FROM message_history m WHERE m.user_id = 42) AS n
shard 2 | | SELECT u.*, (SELECT count(*) FROM message_history m WHERE m.user_id = u.user_id) FROM users u WHERE u.user_id = 42
shard 2 | | WITH recent AS (SELECT * FROM message_history WHERE user_id = 42 ORDER BY id DESC LIMIT 20) SELECT * FROM recent ORDER BY id
shard 2 | | WITH s AS (SELECT * FROM user_sessions) SELECT * FROM s WHERE user_id = 42
shard 2 | | WITH a AS (SELECT * FROM users WHERE user_id = 42), b AS (SELECT * FROM bots) SELECT * FROM a, b
shard 2 | | WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t WHERE n < 5) SELECT * FROM users, t WHERE user_id = 42
shard 2 | | SELECT * FROM users WHERE user_id = 42 UNION SELECT * FROM users WHERE user_id = 46
keys 1 2 | | SELECT * FROM users WHERE user_id = 41 UNION ALL SELECT * FROM users WHERE user_id = 42
all | | SELECT * FROM users WHERE user_id = 42 UNION ALL SELECT * FROM users
all | | SELECT * FROM users u WHERE u.user_id IN (SELECT user_id FROM user_sessions)
# IN lists, ANY, OR
keys 1 2 3 | | SELECT * FROM users WHERE user_id IN (1, 2, 3)
shard 1 | | SELECT * FROM users WHERE user_id IN (1, 5, 9)
keys 1 2 | 1;2 | SELECT * FROM users WHERE user_id IN ($1, $2)
keys 1 2 | | SELECT * FROM users WHERE user_id = 1 OR user_id = 2
keys 1 2 3 | | SELECT * FROM users WHERE user_id = 1 OR (user_id = 2 OR user_id = 3)
keys 5 6 | {5,6} | SELECT * FROM users WHERE user_id = ANY($1)
keys 5 6 | {5,6} | SELECT * FROM users WHERE user_id = ANY($1::bigint[])
keys 7 8 | | SELECT * FROM users WHERE user_id = ANY(ARRAY[7, 8])
shard 1 | {1,5} | SELECT * FROM users WHERE user_id = ANY($1)
any | {} | SELECT * FROM users WHERE user_id = ANY($1)
# no key: reads to every shard
all | | SELECT * FROM users
combine | | SELECT count(*) FROM message_history
all | | SELECT * FROM users WHERE email = 'a@b.c'
all | | SELECT * FROM users WHERE user_id > 100
all | | SELECT * FROM users WHERE user_id <> 5
all | | SELECT * FROM users WHERE NOT (user_id = 5)
all | | SELECT * FROM users WHERE user_id = 5 OR email = 'x'
all | | SELECT * FROM users WHERE user_id NOT IN (1, 2)
all | | SELECT * FROM users WHERE user_id = other_id
err refused | | SELECT * FROM users WHERE user_id = (SELECT max(user_id) FROM users)
all | | SELECT * FROM message_history m JOIN users u ON u.user_id = m.user_id
all | | TABLE users
all | | WITH x AS (SELECT * FROM users) SELECT * FROM x
combine | | SELECT * FROM users ORDER BY created_at DESC LIMIT 10
# across shards: concatenated, combined, or refused (never a different answer)
all | | SELECT u.name, s.id FROM users u JOIN user_sessions s ON s.user_id = u.user_id WHERE s.active
all | | SELECT * FROM users u JOIN user_sessions s USING (user_id)
all | | SELECT * FROM users u, user_sessions s, message_history m WHERE s.user_id = u.user_id AND m.user_id = u.user_id
all | | SELECT * FROM users u JOIN bots b ON b.id = u.bot_id
all | | SELECT * FROM users u WHERE EXISTS (SELECT 1 FROM user_sessions s WHERE s.user_id = u.user_id)
all | | SELECT * FROM users u WHERE u.user_id NOT IN (SELECT user_id FROM user_sessions)
all | | SELECT u.*, (SELECT count(*) FROM message_history m WHERE m.user_id = u.user_id) AS n FROM users u
all | | SELECT * FROM users WHERE bot_id IN (SELECT id FROM bots WHERE name = 'x')
all | | SELECT * FROM users UNION ALL SELECT * FROM users
all | | SELECT user_id, count(*) FROM message_history GROUP BY user_id
all | | SELECT user_id, count(*) FROM message_history GROUP BY 1 HAVING count(*) > 2
all | | SELECT * FROM users FOR UPDATE SKIP LOCKED
all | | WITH m AS (SELECT * FROM message_history WHERE role = 'user') SELECT * FROM m JOIN users u ON u.user_id = m.user_id
combine | | SELECT count(*), sum(tokens), avg(tokens), min(created_at), max(created_at) FROM message_history
combine | | SELECT count(*) FILTER (WHERE role = 'user'), bool_and(ok), bool_or(ok), every(ok) FROM message_history
combine | | SELECT role, count(*) FROM message_history GROUP BY role HAVING count(*) > 1 ORDER BY 2 DESC
combine | | SELECT max(tokens) - min(tokens), sum(tokens)::float / count(*) FROM message_history
combine | | SELECT DISTINCT role FROM message_history
combine | | SELECT * FROM message_history ORDER BY created_at, id LIMIT 10 OFFSET 20
combine | | SELECT * FROM users LIMIT 5
combine | {1,2,3} | SELECT * FROM users WHERE user_id = ANY($1::int8[]) ORDER BY name
combine | | SELECT count(*) FROM users WHERE user_id IN (1, 2, 3)
combine | | SELECT user_id, count(*) FROM message_history GROUP BY user_id ORDER BY 2 DESC LIMIT 3
combine | | SELECT count(*) FROM users u JOIN user_sessions s ON s.user_id = u.user_id
combine | | SELECT b.name, count(*) FROM users u JOIN bots b ON b.id = u.bot_id GROUP BY b.name
combine | | SELECT count(DISTINCT role) FROM message_history
err refused | | SELECT string_agg(content, ',') FROM message_history
err refused | | SELECT array_agg(id ORDER BY id) FROM message_history
err refused | | SELECT stddev(tokens) FROM message_history
err refused | | SELECT id, row_number() OVER (ORDER BY created_at) FROM message_history
err refused | | SELECT DISTINCT ON (user_id) * FROM message_history ORDER BY user_id, created_at DESC
err refused | | SELECT * FROM users u JOIN user_sessions s ON s.id = u.session_id
err refused | | SELECT * FROM users u, message_history m WHERE m.bot_id = u.bot_id
err refused | | SELECT * FROM users WHERE created_at > (SELECT avg(created_at) FROM users)
err refused | | SELECT * FROM users WHERE bot_id IN (SELECT bot_id FROM user_sessions)
err refused | | SELECT * FROM (SELECT user_id, count(*) AS n FROM message_history GROUP BY user_id) t
err refused | | SELECT role FROM message_history UNION SELECT role FROM user_sessions
err refused | | SELECT user_id FROM users INTERSECT SELECT user_id FROM user_sessions
err refused | | WITH c AS (SELECT count(*) FROM users) SELECT * FROM c
err refused | | SELECT role, count(*) FROM message_history GROUP BY ROLLUP (role)
err refused | | SELECT * FROM message_history ORDER BY id LIMIT 1 FOR UPDATE
err refused | | SELECT * FROM users FETCH FIRST 3 ROWS ONLY
err refused | | SELECT count(*) FROM users; SELECT 1
err refused | | DECLARE c CURSOR FOR SELECT * FROM users ORDER BY name
# global tables, no tables, catalogs: any shard
any | | SELECT * FROM bots
any | | SELECT * FROM bots WHERE id = 'b1'
any | | SELECT b.*, t.* FROM bots b JOIN tools t ON t.bot_id = b.id
any | | SELECT * FROM system_config WHERE key = 'x'
any | | SELECT 1
any | | SELECT now()
any | | SELECT version()
any | | SELECT current_setting('server_version_num')
any | | SELECT * FROM generate_series(1, 10)
any | | SELECT * FROM pg_catalog.pg_tables
any | | SELECT relname FROM pg_class WHERE relkind = 'r'
any | | SELECT * FROM information_schema.columns WHERE table_name = 'users'
any | |
# sequences, advisory locks, notifications: the first shard, where every client's calls meet (currval and lastval
# answer for the connection that called nextval: where the transaction is)
shard 0 | | SELECT nextval('s')
shard 0 | | SELECT nextval('public.s'::regclass)
shard 0 | | SELECT pg_catalog.nextval('s')
shard 0 | | SELECT setval('s', 42, true)
shard 0 | | SELECT NEXTVAL('s') AS id
shard 0 | | SELECT nextval('s'), name FROM bots WHERE id = 'b1'
shard 0 | | SELECT pg_advisory_xact_lock(7)
shard 0 | 7 | SELECT pg_try_advisory_xact_lock($1)
shard 0 | | SELECT pg_advisory_xact_lock_shared(1, 2)
shard 0 | | SELECT pg_advisory_lock(7)
shard 0 | | SELECT pg_advisory_unlock_all()
shard 0 | | SELECT CASE WHEN pg_try_advisory_xact_lock(7) THEN 1 ELSE 0 END
shard 0 | | SELECT nextval('s'); SELECT 1
shard 0 | | SELECT pg_notify('jobs', 'ready')
shard 0 | | NOTIFY jobs, 'ready'
shard 0 | | NOTIFY jobs
any | | SELECT currval('s')
any | | SELECT lastval()
keys 42 | | SELECT nextval('s') FROM users WHERE user_id = 42
# inserts
shard 1 | | INSERT INTO users (user_id, name) VALUES (12345, 'ana')
shard 1 | 12345;ana | INSERT INTO users (user_id, name) VALUES ($1, $2)
shard 1 | ana;12345 | INSERT INTO users (name, user_id) VALUES ($1, $2)
shard 2 | | INSERT INTO message_history (user_id, session_id, role, content) VALUES (42, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'user', 'hi') RETURNING id
shard 2 | | INSERT INTO users (user_id, name) VALUES (42, 'x') ON CONFLICT (user_id) DO UPDATE SET name = EXCLUDED.name RETURNING *
shard 2 | | INSERT INTO users (user_id, name) VALUES (42, 'x') ON CONFLICT DO NOTHING
shard 1 | | INSERT INTO users (user_id, name) VALUES (1, 'a'), (5, 'b'), (9, 'c')
keys 1 2 | | INSERT INTO users (user_id, name) VALUES (1, 'a'), (2, 'b')
keys 1 2 5 | 1;2 | INSERT INTO users (user_id, name) VALUES ($1, 'a'), ($2, 'b'), (5, 'c') RETURNING user_id
err spans | | INSERT INTO message_history (user_id, content) SELECT user_id, content FROM message_history WHERE user_id IN (1, 2)
err spans | | INSERT INTO users (user_id, name) VALUES (1, 'a'); INSERT INTO users (user_id, name) VALUES (2, 'b')
# EXPLAIN ANALYZE runs the write: whole, on one shard
shard 3 | | EXPLAIN ANALYZE DELETE FROM users WHERE user_id = 3
err spans | | EXPLAIN ANALYZE UPDATE users SET name = 'x' WHERE user_id IN (1, 2)
err spans | | EXPLAIN (ANALYZE) INSERT INTO users (user_id) VALUES (1), (2)
err missing | | EXPLAIN ANALYZE DELETE FROM users
err refused | | EXPLAIN ANALYZE INSERT INTO bots (id) VALUES (1)
keys 1 2 | | EXPLAIN (ANALYZE false) UPDATE users SET name = 'x' WHERE user_id IN (1, 2)
# subqueries whose rows are not each shard's part, sharded reads where no key is looked for
err refused | | SELECT * FROM users WHERE user_id IN (SELECT user_id FROM message_history LIMIT 3)
err refused | | SELECT * FROM users u WHERE EXISTS (SELECT 1 FROM message_history m WHERE m.user_id = u.user_id AND m.id > (SELECT avg(id) FROM message_history))
all | | SELECT * FROM users WHERE user_id IN (SELECT DISTINCT user_id FROM message_history)
err refused | | VALUES ((SELECT count(*) FROM users))
err refused | | SELECT * FROM bots ORDER BY (SELECT count(*) FROM users)
err refused | | SELECT nextval('s'), user_id FROM users
# outer joins: ON does not filter the preserved side; a global table's unmatched rows once
all | | SELECT * FROM users u LEFT JOIN message_history m ON m.user_id = u.user_id AND m.user_id = 5
shard 1 | | SELECT * FROM users u JOIN message_history m ON m.user_id = u.user_id AND u.user_id = 5
shard 1 | | SELECT * FROM users u LEFT JOIN message_history m ON m.user_id = u.user_id WHERE u.user_id = 5
all | | SELECT * FROM users u LEFT JOIN bots b ON b.id = u.bot_id
err refused | | SELECT * FROM bots b LEFT JOIN users u ON u.bot_id = b.id
err refused | | SELECT * FROM users u RIGHT JOIN bots b ON u.bot_id = b.id
err refused | | SELECT * FROM users u FULL JOIN bots b ON u.bot_id = b.id
# a WITH query that writes is a write, whole on one shard
shard 1 | | WITH d AS (DELETE FROM users WHERE user_id = 1 RETURNING *) SELECT * FROM d
err spans | | WITH i AS (INSERT INTO users (user_id) VALUES (1), (2) RETURNING *) SELECT * FROM i
err missing | | WITH d AS (DELETE FROM users RETURNING *) SELECT count(*) FROM d
err refused | | WITH u AS (UPDATE bots SET name = 'x' RETURNING *) SELECT * FROM u
# writes on several shards read only each shard's part
err refused | | UPDATE users SET name = (SELECT max(content) FROM message_history) WHERE user_id IN (1, 2)
err refused | | DELETE FROM message_history WHERE user_id IN (1, 2) AND id = (SELECT max(id) FROM message_history)
err refused | | DELETE FROM users u USING message_history m WHERE m.id = u.name AND u.user_id IN (1, 2)
err refused | | INSERT INTO users (user_id, name) VALUES (1, (SELECT max(content) FROM message_history)), (2, 'b')
keys 1 2 | | UPDATE users u SET name = m.content FROM message_history m WHERE m.user_id = u.user_id AND u.user_id IN (1, 2)
keys 1 2 | | DELETE FROM users WHERE user_id IN (1, 2) AND EXISTS (SELECT 1 FROM message_history m WHERE m.user_id = users.user_id)
keys 1 2 | | INSERT INTO users (user_id, name) VALUES (1, DEFAULT), (2, 'b')
shard 1 | | UPDATE users SET name = (SELECT max(content) FROM message_history) WHERE user_id = 1
shard 2 | | INSERT INTO usage_analytics (user_id, bot_id, tokens) VALUES (42, 'b1', 10)
shard 2 | | INSERT INTO message_history (user_id, content) SELECT user_id, content FROM message_history WHERE user_id = 42
err missing | | INSERT INTO archive SELECT * FROM message_history
err missing | | INSERT INTO users (name) VALUES ('x')
err position | | INSERT INTO users VALUES (42, 'x')
err refused | | INSERT INTO users (user_id, name) VALUES (nextval('s'), 'x')
err refused | | INSERT INTO users (user_id, name) VALUES (DEFAULT, 'x')
err refused | | INSERT INTO users (user_id, name) VALUES (42, 'x') ON CONFLICT (user_id) DO UPDATE SET user_id = 43
shard 2 | | INSERT INTO users (user_id, name) VALUES (42, 'x') ON CONFLICT (user_id) DO UPDATE SET name = 'y' WHERE users.user_id = 42
# INSERT ... SELECT goes where the inserted key says; what it reads must be there
shard 2 | | INSERT INTO archive (user_id, name) SELECT 42, name FROM bots
shard 2 | 42 | INSERT INTO archive (user_id, name) SELECT $1, name FROM users WHERE user_id = $1
err spans | | INSERT INTO archive (user_id, name) SELECT 42, name FROM users WHERE user_id = 43
err refused | | INSERT INTO archive (user_id, name) SELECT 42, name FROM users
err missing | | INSERT INTO archive (user_id, name) SELECT user_id, name FROM users
err refused | | INSERT INTO archive (user_id, name) SELECT user_id + 1, name FROM users WHERE user_id = 42
err missing | | INSERT INTO archive (name) SELECT name FROM users WHERE user_id = 42
all | | INSERT INTO bots (id, name) VALUES ('b1', 'Helper')
all | | INSERT INTO tools (bot_id, name) VALUES ('b1', 'search') ON CONFLICT DO NOTHING
shard 2 | | WITH ins AS (INSERT INTO users (user_id, name) VALUES (42, 'x') RETURNING *) SELECT * FROM ins
# updates and deletes
shard 2 | | UPDATE users SET name = 'x' WHERE user_id = 42
shard 2 | x;42 | UPDATE users SET name = $1 WHERE user_id = $2
shard 2 | | UPDATE users u SET name = 'x' WHERE u.user_id = 42 RETURNING *
shard 2 | | UPDATE user_sessions SET last_seen = now() WHERE user_id = 42 AND id = 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'
shard 2 | | UPDATE usage_analytics SET tokens = tokens + 1 WHERE user_id = 42 AND bot_id = 'b1'
shard 2 | | UPDATE users SET bot_id = b.id FROM bots b WHERE b.name = 'x' AND users.user_id = 42
err missing | | UPDATE users SET name = 'x'
err missing | | UPDATE users SET name = 'x' WHERE email = 'a@b.c'
keys 1 2 | | UPDATE users SET name = 'x' WHERE user_id IN (1, 2)
keys 1 2 | | DELETE FROM users WHERE user_id IN (1, 2) RETURNING name
err refused | | UPDATE users SET user_id = 7 WHERE user_id = 42
all | | UPDATE bots SET name = 'y' WHERE id = 'b1'
shard 2 | | DELETE FROM message_history WHERE user_id = 42
shard 2 | 42 | DELETE FROM message_history WHERE user_id = $1 AND created_at < now() - interval '30 days'
shard 2 | | DELETE FROM user_sessions s WHERE s.user_id = 42 RETURNING s.id
shard 2 | | DELETE FROM message_history WHERE user_id = 42 AND session_id IN (SELECT id FROM user_sessions WHERE expired)
err missing | | DELETE FROM message_history
err missing | | DELETE FROM message_history WHERE created_at < now() - interval '30 days'
all | | DELETE FROM tools WHERE bot_id = 'b1'
err refused | | UPDATE bots SET owner = u.name FROM users u WHERE u.user_id = 42 AND bots.id = u.bot_id
# global tables stay identical
all | | INSERT INTO bots (id, name, created_at) VALUES (gen_random_uuid(), 'x', now())
all | | UPDATE bots SET name = upper(name) WHERE id = 'b1'
all | | UPDATE bots SET seen = now() WHERE id = 'b1'
err refused | | UPDATE bots SET token = gen_random_uuid() WHERE id = 'b1'
err refused | | DELETE FROM bots WHERE random() < 0.5
err refused | | INSERT INTO bots (id, name) SELECT bot_id, name FROM users
err refused | | DELETE FROM bots USING users u WHERE u.user_id = 42 AND bots.id = u.bot_id
shard 2 | | DELETE FROM message_history m USING user_sessions s WHERE s.id = m.session_id AND m.user_id = 42
any | | UPDATE pg_catalog.pg_settings SET setting = '1' WHERE name = 'x'
# hints and session keys
shard 2 | | /* shard_key: 42 */ SELECT * FROM users WHERE email = 'x'
shard 2 | | /* shard_key: 42 */ UPDATE users SET name = 'x' WHERE email = 'y'
shard 3 | | SELECT * FROM users /* shard: 3 */
shard 0 | | /* shard: 0 */ DELETE FROM message_history
err unknown | | /* shard: 9 */ SELECT 1
session | | SET gb.shard_key = 42
session | | SET gb.shard_key TO '42'
session | | RESET gb.shard_key
# transaction control and session statements
session | | BEGIN
session | | BEGIN ISOLATION LEVEL SERIALIZABLE
session | | PREPARE TRANSACTION 'gid-1'
session | | COMMIT PREPARED 'gid-1'
session | | ROLLBACK PREPARED 'gid-1'
# cursors: DECLARE by its query; FETCH, MOVE, CLOSE where the transaction is
shard 2 | | DECLARE c CURSOR FOR SELECT * FROM users WHERE user_id = 42
shard 2 | | DECLARE c NO SCROLL CURSOR WITH HOLD FOR SELECT * FROM users WHERE user_id = 42
all | | DECLARE c CURSOR FOR SELECT * FROM users
session | | FETCH 10 FROM c
session | | FETCH ALL IN c
session | | MOVE FORWARD 2 IN c
session | | CLOSE c
# what sqlparser cannot parse: by its words
any | | SELEC 1
any | | SELECT * FROM bots WHERE name SIMILAR TO 'x' ESCAPE
err refused | | SELECT * FROM users WHERE user_id = 1 AND name SIMILAR TO 'x' ESCAPE
all | | VACUUM (VERBOSE, ANALYZE) users
all | | TABLE users
session | | START TRANSACTION READ ONLY
session | | COMMIT
session | | ROLLBACK
session | | SAVEPOINT s1
session | | RELEASE SAVEPOINT s1
session | | ROLLBACK TO SAVEPOINT s1
session | | SET search_path TO public
session | | SET statement_timeout = 5000
session | | SET TIME ZONE 'UTC'
session | | SHOW server_version
session | | RESET ALL
session | | DISCARD ALL
session | | LISTEN events
session | | UNLISTEN *
session | | DEALLOCATE ALL
# DDL: every shard
all | | CREATE TABLE users (user_id bigint PRIMARY KEY, name text)
all | | CREATE TABLE IF NOT EXISTS message_history (id bigserial, user_id bigint NOT NULL, content text, PRIMARY KEY (user_id, id))
all | | CREATE INDEX idx_mh_user ON message_history (user_id, created_at)
all | | CREATE UNIQUE INDEX CONCURRENTLY idx_u_email ON users (email)
all | | ALTER TABLE users ADD COLUMN last_login timestamptz
all | | ALTER TABLE message_history DROP COLUMN IF EXISTS legacy
all | | DROP TABLE IF EXISTS tmp_import
all | | DROP INDEX IF EXISTS idx_old
all | | CREATE EXTENSION IF NOT EXISTS "uuid-ossp"
all | | CREATE SCHEMA IF NOT EXISTS analytics
all | | CREATE VIEW v AS SELECT * FROM users
all | | CREATE SEQUENCE s START 1
all | | TRUNCATE usage_analytics
all | | COMMENT ON TABLE users IS 'people'
all | | GRANT SELECT ON users TO reader
all | | VACUUM ANALYZE users
all | | CREATE FUNCTION f() RETURNS int AS $$ SELECT 1 $$ LANGUAGE sql
all | | DO $$ BEGIN PERFORM 1; END $$
# multi-statement strings
shard 2 | | BEGIN; UPDATE users SET name = 'x' WHERE user_id = 42; COMMIT
shard 2 | | SELECT * FROM users WHERE user_id = 42; SELECT * FROM message_history WHERE user_id = 46
err spans | | SELECT * FROM users WHERE user_id = 41; SELECT * FROM users WHERE user_id = 42
all | | CREATE TABLE a (user_id bigint); CREATE INDEX ON a (user_id)
err spans | | CREATE TABLE a (user_id bigint); INSERT INTO a (user_id) VALUES (1)
shard 2 | | SELECT 1; SELECT * FROM users WHERE user_id = 42
# COPY
all | | COPY users (user_id, name) FROM STDIN
all | | COPY users (name, user_id) FROM STDIN WITH (FORMAT csv, HEADER true)
all | | COPY message_history (user_id, content) FROM STDIN CSV
all | | COPY users FROM STDIN
err refused | | COPY users (name) FROM STDIN
all | | COPY users (user_id) FROM STDIN WITH (FORMAT binary)
all | | copy users from stdin with (freeze on)
all | | COPY users (user_id, name) FROM STDIN WITH (FORMAT csv, FREEZE true, HEADER match)
err refused | | COPY users FROM '/etc/passwd'
all | | COPY users TO STDOUT
shard 2 | | COPY (SELECT * FROM users WHERE user_id = 42) TO STDOUT
any | | COPY bots TO STDOUT
all | | COPY bots (id, name) FROM STDIN
# parameters that cannot be keys
err param | | SELECT * FROM users WHERE user_id = $1
err param | NULL | SELECT * FROM users WHERE user_id = $1
keys abc | abc | SELECT * FROM users WHERE user_id = $1
err refused | | SELECT * FROM users WHERE user_id = 1.5
# PostgreSQL the parser does not know still routes by its first word
all | | CREATE STATISTICS s ON a, b FROM users WITH garbage that does not parse
"#;

const UUID_ROUTES: &str = r#"
keys a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11 | | SELECT * FROM users WHERE user_id = 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'
keys a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11 | | SELECT * FROM users WHERE user_id = 'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11'
keys a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11 | | SELECT * FROM users WHERE user_id = '{a0eebc999c0b4ef8bb6d6bb9bd380a11}'
keys a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11 | | SELECT * FROM users WHERE user_id = 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid
keys a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11 | | SELECT * FROM users WHERE user_id = uuid 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'
keys a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11 | a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11 | SELECT * FROM message_history WHERE user_id = $1 ORDER BY created_at DESC LIMIT 50
keys a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11 | a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11 | SELECT * FROM user_sessions s WHERE s.user_id = $1 AND s.expires_at > now()
keys a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11 | a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11;x | INSERT INTO users (user_id, name) VALUES ($1, $2)
keys a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11 | | INSERT INTO message_history (id, user_id, bot_id, content) VALUES (gen_random_uuid(), 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'b', 'hi')
keys a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11 | a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11 | UPDATE user_sessions SET last_seen = now() WHERE user_id = $1
keys a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11 | a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11 | DELETE FROM usage_analytics WHERE user_id = $1
keys 00000000-0000-0000-0000-000000000001 00000000-0000-0000-0000-000000000002 | {00000000-0000-0000-0000-000000000001,00000000-0000-0000-0000-000000000002} | SELECT * FROM users WHERE user_id = ANY($1)
err refused | | SELECT * FROM users WHERE user_id = 'not-a-uuid'
err refused | | SELECT * FROM users WHERE user_id = 42
err param | 42 | SELECT * FROM users WHERE user_id = $1
any | | SELECT * FROM bots WHERE id = 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'
all | | SELECT * FROM users WHERE email = 'x'
err missing | | UPDATE users SET name = 'x' WHERE email = 'y'
"#;

/// Each table its own key: `users` by `id`, `session_tools` by `session_id`, the rest by `user_id`.
const TABLE_KEYS: &str = "shard-strategy,hash\nshard-count,4\nshard-key,user_id\nshard-algorithm,modulo\nshard-global-tables,bots\nshard-table-users,id\nshard-table-session_tools,session_id\n";

const TABLE_KEY_ROUTES: &str = r#"
keys 5 | | SELECT * FROM users WHERE id = 5
keys 5 | | SELECT * FROM users u WHERE u.id = 5
all | | SELECT * FROM users WHERE user_id = 5
keys 5 | | SELECT * FROM messages WHERE user_id = 5
all | | SELECT * FROM messages WHERE id = 5
keys 5 | | SELECT * FROM users u JOIN messages m ON m.user_id = u.id WHERE u.id = 5
keys 5 | | SELECT * FROM users u JOIN messages m ON m.user_id = u.id WHERE m.user_id = 5
keys 5 | | SELECT * FROM users WHERE id = 5 AND EXISTS (SELECT 1 FROM messages m WHERE m.user_id = users.id)
all | | SELECT * FROM users u JOIN messages m ON m.user_id = u.id
all | | SELECT * FROM users u WHERE EXISTS (SELECT 1 FROM messages m WHERE m.user_id = u.id)
err refused | | SELECT * FROM users u JOIN messages m ON m.id = u.id
err refused | | SELECT * FROM users u JOIN messages m ON m.user_id = u.user_id
combine | | SELECT count(*) FROM users u JOIN messages m ON m.user_id = u.id
keys 7 | | SELECT * FROM session_tools WHERE session_id = 7
all | | SELECT * FROM session_tools WHERE user_id = 7
keys 9 | | INSERT INTO users (id, name) VALUES (9, 'x')
keys 9 | 9 | INSERT INTO users (name, id) VALUES ('x', $1)
err missing | | INSERT INTO users (user_id, name) VALUES (9, 'x')
keys 9 | | INSERT INTO messages (user_id, id) VALUES (9, 1)
keys 9 | | INSERT INTO session_tools (session_id, user_id) VALUES (9, 1)
err refused | | UPDATE users SET id = 3 WHERE id = 2
keys 7 | | UPDATE users SET user_id = 3 WHERE id = 7
err missing | | UPDATE users SET name = 'x' WHERE user_id = 7
err refused | | INSERT INTO users (id, name) VALUES (1, 'x') ON CONFLICT (id) DO UPDATE SET id = 2
all | | COPY users (id, name) FROM STDIN
err refused | | COPY users (user_id, name) FROM STDIN
keys 4 | | SELECT * FROM users WHERE id IN (SELECT user_id FROM messages WHERE user_id = 4)
"#;

fn planner(config: &str) -> Planner {
    let c = Config::parse("test.csv", config.as_bytes()).expect("config");
    Planner::new(Arc::new(ShardMap::new(&c).expect("map")))
}

fn err_kind(e: &RouteError) -> &'static str {
    match e {
        RouteError::MissingKey { .. } => "missing",
        RouteError::Refused(_) | RouteError::BadKey { .. } => "refused",
        RouteError::SpansShards { .. } => "spans",
        RouteError::Param(_) => "param",
        RouteError::UnknownShard(_) => "unknown",
        RouteError::NoTenant { .. } => "notenant",
        RouteError::Place(_) => "place",
        RouteError::KeyPosition { .. } => "position",
        RouteError::Relations { .. } => "relations",
    }
}

/// Runs a table; returns how many rows it checked.
fn run_table(p: &Planner, table: &str) -> usize {
    let map = p.map().clone();
    let mut n = 0;
    let mut failures = Vec::new();
    for line in table.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.splitn(3, '|').map(str::trim);
        let (expect, params, sql) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap_or(""));
        let params = TextParams(if params.is_empty() {
            Vec::new()
        } else {
            params.split(';').map(|p| (p != "NULL").then(|| p.to_string())).collect()
        });
        n += 1;
        let got = p.decide(sql, &params, &Session::default());
        if params.0.is_empty() {
            // The simple protocol's path (literals taken out into a shared shape) decides the same.
            let simple = p.decide_simple(sql, &Session::default());
            let same = match (&got, &simple) {
                (Ok(a), Ok(b)) => a.target == b.target && a.values == b.values,
                (Err(a), Err(b)) => {
                    err_kind(a) == err_kind(b) || (err_kind(a) == "refused" && err_kind(b) == "refused")
                }
                _ => false,
            };
            if !same {
                failures.push(format!("{sql}\n    text path {got:?}\n    shape path {simple:?}"));
            }
        }
        let (word, arg) = expect.split_once(' ').unwrap_or((expect, ""));
        let ok = match (word, &got) {
            ("shard", Ok(d)) => d.target == Target::One(map.shard_by_name(arg).expect("shard name")),
            ("keys", Ok(d)) => {
                let mut shards: Vec<_> = arg
                    .split(' ')
                    .map(|v| map.locate(&KeyValue::from_text(v, map.key_type).unwrap()).unwrap().shard)
                    .collect();
                shards.sort();
                shards.dedup();
                let want = if shards.len() == 1 { Target::One(shards[0]) } else { Target::Set(shards) };
                d.target == want
            }
            ("all", Ok(d)) => d.target == Target::All && d.analysis.statements.iter().all(|s| s.cross == Cross::Concat),
            ("combine", Ok(d)) => {
                matches!(d.target, Target::All | Target::Set(_))
                    && d.analysis.statements.iter().all(|s| s.cross == Cross::Combine)
            }
            ("any", Ok(d)) => d.target == Target::Any,
            ("session", Ok(d)) => d.target == Target::Session,
            ("err", Err(e)) => err_kind(e) == arg,
            _ => false,
        };
        if !ok {
            failures.push(format!("{sql}\n    expected {expect}, got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{} of {n} routes wrong:\n{}", failures.len(), failures.join("\n"));
    n
}

#[test]
fn each_table_its_own_key() {
    run_table(&planner(TABLE_KEYS), TABLE_KEY_ROUTES);
    // explain names the column it used.
    let p = planner(TABLE_KEYS);
    let d = p.decide("SELECT * FROM users WHERE id = 5", &TextParams(Vec::new()), &Session::default()).unwrap();
    assert_eq!(d.to_json(p.map())["key"], "id");
    let d = p.decide("SELECT * FROM messages WHERE user_id = 5", &TextParams(Vec::new()), &Session::default()).unwrap();
    assert_eq!(d.to_json(p.map())["key"], "user_id");
}

#[test]
fn insert_without_a_column_list_reads_the_key_at_its_position() {
    let p = planner(TABLE_KEYS);
    let none = TextParams(Vec::new());
    let mut session = Session::default();
    let d = p.decide("INSERT INTO messages VALUES (1, 5, 'x')", &none, &session);
    assert!(matches!(d, Err(RouteError::KeyPosition { ref table }) if table == "messages"), "{d:?}");
    session.key_positions.insert("messages".into(), Some(1));
    session.key_positions.insert("users".into(), Some(0));
    let at = |v: i64| Target::One(p.map().locate(&KeyValue::Int(v)).unwrap().shard);
    let d = p.decide("INSERT INTO messages VALUES (1, 5, 'x')", &none, &session).unwrap();
    assert_eq!(d.target, at(5));
    let d =
        p.decide("INSERT INTO messages VALUES (1, $1, 'x')", &TextParams(vec![Some("6".into())]), &session).unwrap();
    assert_eq!(d.target, at(6));
    let d = p.decide("INSERT INTO users VALUES (7, 'x'), (11, 'y')", &none, &session).unwrap();
    assert_eq!(d.target, at(7));
    let d = p.decide("INSERT INTO users VALUES (7, 'x'), (8, 'y')", &none, &session).unwrap();
    assert!(matches!(d.target, Target::Set(ref s) if s.len() == 2), "{d:?}");
    // Without two-phase commit, rows for several shards are refused.
    let off = planner(&format!("{TABLE_KEYS}shard-two-phase-commit,false\n"));
    let d = off.decide("INSERT INTO users VALUES (7, 'x'), (8, 'y')", &none, &session);
    assert!(matches!(d, Err(RouteError::SpansShards { .. })), "{d:?}");
    let d = off.decide("UPDATE messages SET body = 'x' WHERE user_id IN (1, 2)", &none, &session);
    assert!(matches!(d, Err(RouteError::SpansShards { .. })), "{d:?}");
    let d = p.decide("INSERT INTO users VALUES (DEFAULT, 'x')", &none, &session);
    assert!(matches!(d, Err(RouteError::Refused(ref m)) if m.contains("row 1 gives id")), "{d:?}");
    session.key_positions.insert("users".into(), None);
    let d = p.decide("INSERT INTO users VALUES (7, 'x')", &none, &session);
    assert!(matches!(d, Err(RouteError::Refused(ref m)) if m.contains("has no column id")), "{d:?}");
}

#[test]
fn bigint_routes() {
    let n = run_table(&planner(BIGINT), BIGINT_ROUTES);
    assert!(n >= 150, "only {n} statements");
}

#[test]
fn uuid_routes() {
    run_table(&planner(UUID), UUID_ROUTES);
}

#[test]
fn session_key_routes_keyless_statements() {
    let p = planner(BIGINT);
    let map = p.map().clone();
    let mut s = Session::default();
    let set = p.analyze("SET gb.shard_key = 42");
    s.apply(set.statements[0].session.as_ref().unwrap(), &map).unwrap();
    assert_eq!(s.shard_key, Some(KeyValue::Int(42)));
    let d = p.decide("UPDATE users SET name = 'x' WHERE email = 'y'", &TextParams(vec![]), &s).unwrap();
    assert_eq!(d.target, Target::One(map.shard_by_name("2").unwrap()));
    // An explicit key still wins over the session's.
    let d = p.decide("SELECT * FROM users WHERE user_id = 1", &TextParams(vec![]), &s).unwrap();
    assert_eq!(d.target, Target::One(map.shard_by_name("1").unwrap()));
    let reset = p.analyze("RESET gb.shard_key");
    s.apply(reset.statements[0].session.as_ref().unwrap(), &map).unwrap();
    assert_eq!(s.shard_key, None);
}

#[test]
fn binary_parameters() {
    use shardmap::{Param, Params};
    struct Bin(Vec<(Vec<u8>, u32)>);
    impl Params for Bin {
        fn param(&self, i: usize) -> Option<Param<'_>> {
            self.0.get(i).map(|(v, oid)| Param { value: Some(v), binary: true, oid: *oid })
        }
    }
    let p = planner(BIGINT);
    let map = p.map().clone();
    for (bytes, oid) in [
        (12345i64.to_be_bytes().to_vec(), 20),
        (12345i32.to_be_bytes().to_vec(), 23),
        (12345i32.to_be_bytes().to_vec(), 0),
        (b"12345".to_vec(), 25),
    ] {
        let d =
            p.decide("SELECT * FROM users WHERE user_id = $1", &Bin(vec![(bytes, oid)]), &Session::default()).unwrap();
        assert_eq!(d.target, Target::One(map.shard_by_name("1").unwrap()));
    }
    let p = planner(UUID);
    let u = KeyValue::parse_uuid(U1).unwrap();
    let KeyValue::Uuid(raw) = u.clone() else { unreachable!() };
    let want = p.map().locate(&u).unwrap().shard;
    let d = p
        .decide("SELECT * FROM users WHERE user_id = $1", &Bin(vec![(raw.to_vec(), 2950)]), &Session::default())
        .unwrap();
    assert_eq!(d.target, Target::One(want));
    assert_eq!(d.values, vec![u]);
    assert_eq!(d.buckets.len(), 1);
}

#[test]
fn explain_json_shape() {
    let p = planner(BIGINT);
    let d = p.decide("SELECT * FROM users WHERE user_id = 12345", &TextParams(vec![]), &Session::default()).unwrap();
    assert_eq!(
        d.to_json(p.map()).to_string(),
        r#"{"strategy":"hash","key":"user_id","values":["12345"],"shards":["1"],"target":"one","reason":"user_id = 12345"}"#
    );
    // Why a statement with no key goes to the first shard.
    for (sql, what) in [("SELECT nextval('s')", "nextval()"), ("NOTIFY jobs", "NOTIFY")] {
        let d = p.decide(sql, &TextParams(vec![]), &Session::default()).unwrap();
        assert_eq!(
            d.to_json(p.map())["reason"],
            format!("{what}: sequences, advisory locks and notifications are the first shard's"),
            "{sql}"
        );
    }
    let p = planner(UUID);
    let d = p
        .decide(&format!("SELECT * FROM users WHERE user_id = '{U1}'"), &TextParams(vec![]), &Session::default())
        .unwrap();
    let j = d.to_json(p.map());
    let b = j["bucket"].as_u64().expect("bucket");
    assert!(b < 1024);
    assert_eq!(j["shards"][0].as_str().unwrap(), (b % 4).to_string());
}

/// A read across shards asks what the relations it names are (the router learns it from a shard, into
/// `Session::relations`); a view is classed by its definition. Reads with a key never ask.
#[test]
fn reads_across_shards_follow_what_their_relations_are() {
    use shardmap::{NoParams, Relation, ShardId};
    let p = planner(BIGINT);
    let mut s = Session { relations: Some(Default::default()), ..Default::default() };
    let names = |r: Result<shardmap::Decision, RouteError>| match r {
        Err(RouteError::Relations { names }) => names,
        other => panic!("expected a question, got {other:?}"),
    };
    assert_eq!(names(p.decide("SELECT * FROM v JOIN s.w ON true, bots", &NoParams, &s)), ["v", "s.w"]);
    // (A WITH query's name and the system catalogs are not asked about; a key decides alone.)
    assert_eq!(names(p.decide("WITH q AS (SELECT 1) SELECT * FROM q, users, pg_class", &NoParams, &s)), ["users"]);
    assert_eq!(p.decide("SELECT * FROM v WHERE user_id = 5", &NoParams, &s).unwrap().target, Target::One(ShardId(1)));
    // `explain` knows nothing of the servers: every name is a table.
    let offline = Session::default();
    assert_eq!(p.decide("SELECT * FROM v", &NoParams, &offline).unwrap().target, Target::All);

    let known = s.relations.as_mut().unwrap();
    known.insert("users".into(), Relation::Sharded);
    assert_eq!(
        p.view_relation(" SELECT users.user_id, users.name FROM users WHERE users.active;", known),
        Ok(Relation::Sharded)
    );
    assert_eq!(p.view_relation("SELECT id, name FROM bots", known), Ok(Relation::Global));
    assert!(
        matches!(p.view_relation("SELECT count(*) AS n FROM users", known), Ok(Relation::Opaque(w)) if w.contains("aggregates"))
    );
    assert!(matches!(p.view_relation("SELECT * FROM users ORDER BY name LIMIT 3", known), Ok(Relation::Opaque(_))));
    assert_eq!(
        p.view_relation("SELECT user_id, count(*) FROM messages GROUP BY user_id", known),
        Err(vec!["messages".to_string()])
    );
    known.insert("messages".into(), Relation::Sharded);
    assert_eq!(
        p.view_relation("SELECT user_id, count(*) FROM messages GROUP BY user_id", known),
        Ok(Relation::Sharded)
    );
    known.insert("counter".into(), Relation::Sequence);
    assert!(
        matches!(p.view_relation("SELECT last_value FROM counter", known), Ok(Relation::Opaque(w)) if w.contains("sequence"))
    );
    known.insert("v".into(), Relation::Opaque("a view whose rows each shard computes from its own part".into()));
    known.insert("g".into(), Relation::Global);
    known.insert("s.w".into(), Relation::Sharded);

    let refused = |sql: &str| match p.decide(sql, &NoParams, &s) {
        Err(RouteError::Refused(why)) => why,
        other => panic!("{sql}: expected a refusal, got {other:?}"),
    };
    assert!(refused("SELECT * FROM v").contains("reading v across shards is not supported: it is a view whose rows"));
    assert!(refused("SELECT * FROM users u, counter c").contains("the sequence counter"));
    let target = |sql: &str| p.decide(sql, &NoParams, &s).unwrap().target;
    assert_eq!(target("SELECT last_value FROM counter"), Target::One(ShardId(0)));
    assert_eq!(target("SELECT count(*) FROM g"), Target::Any);
    assert_eq!(target("SELECT * FROM s.w JOIN users USING (user_id)"), Target::All);
    assert_eq!(target("SELECT * FROM s.w WHERE user_id IN (1, 2)"), Target::Set(vec![ShardId(1), ShardId(2)]));
    // (Keys on several shards are a read across shards too.)
    assert!(refused("SELECT * FROM v WHERE user_id IN (1, 2)").contains("reading v across shards"));
}
