"""psycopg 3's own behaviour through shard-router, run by tests/tests/router_psycopg.rs in transaction and in
session pooling: pipelines with errors and explicit syncs, COPY in transactions (text and binary, write_row,
an error mid-copy), server-side cursors, statements before a transaction's first keyed statement, two-phase
commit, client_encoding, ParameterStatus after SET, notices.

Usage: python3 psycopg_protocol.py "host=... port=... user=postgres dbname=postgres" SHARDS
The table users (user_id bigint primary key, name text, n int) exists; keys k live on shard k % SHARDS.
Prints one line per check and "ok" at the end; any failure raises.
"""
import datetime
import sys

import psycopg
from psycopg import errors

conninfo = sys.argv[1]


def count(conn, where, params=()):
    # (A count over several shards comes as one row per shard until the router merges aggregates: summed.)
    return sum(r[0] for r in conn.execute(f"SELECT count(*) FROM users WHERE {where}", params).fetchall())


# Pipelines: an error skips the rest of its sync group and nothing hangs; the next group runs.
with psycopg.connect(conninfo, autocommit=True) as conn:
    with conn.pipeline() as p:
        c1 = conn.execute("select 1")
        c2 = None
        try:
            conn.execute("select * from doesnotexist")
            c3 = conn.execute("select 'x'")
            p.sync()
        except errors.UndefinedTable:
            pass
        c4 = conn.execute("select 2")
    assert c1.fetchone() == (1,)
    assert c4.fetchone() == (2,)
    print("pipeline error")
    # A pipeline of keyed writes to several shards, then an error: the whole group is rolled back, as in one
    # server's implicit transaction.
    try:
        with conn.pipeline():
            for k in range(1000, 1004):
                conn.execute("INSERT INTO users (user_id, name) VALUES (%s, 'p')", (k,))
            conn.execute("INSERT INTO users (user_id, name) VALUES (%s, 'dup')", (1000,))
        raise AssertionError("the duplicate key was accepted")
    except errors.UniqueViolation:
        pass
    assert count(conn, "user_id BETWEEN 1000 AND 1003") == 0, "a failed pipeline left rows"
    with conn.pipeline():
        for k in range(1000, 1004):
            conn.execute("INSERT INTO users (user_id, name) VALUES (%s, 'p')", (k,))
    assert count(conn, "user_id BETWEEN 1000 AND 1003") == 4
    print("pipeline atomic")

# COPY in a transaction (psycopg's default connections are not autocommit): text and binary, write_row.
with psycopg.connect(conninfo) as conn:
    with conn.cursor() as cur:
        with cur.copy("COPY users (user_id, name, n) FROM STDIN") as copy:
            for k in range(2000, 2010):
                copy.write_row((k, f"c{k}", k))
        with cur.copy("COPY users (user_id, name, n) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["int8", "text", "int4"])
            for k in range(2010, 2020):
                copy.write_row((k, f"b{k}", k))
    conn.commit()
    assert count(conn, "user_id BETWEEN 2000 AND 2019") == 20
    assert conn.execute("SELECT name FROM users WHERE user_id = 2015").fetchone() == ("b2015",)
    conn.commit()
    # An error mid-copy: CopyFail, the transaction is aborted, nothing is written.
    with conn.cursor() as cur:
        try:
            with cur.copy("COPY users (user_id, name) FROM STDIN") as copy:
                copy.write_row((2100, "x"))
                raise RuntimeError("the client gives up")
        except RuntimeError:
            pass
    conn.rollback()
    assert count(conn, "user_id = 2100") == 0
    conn.commit()
    print("copy in transactions")

# Server-side cursors (DECLARE, FETCH, MOVE, CLOSE) stay on the transaction's connection.
with psycopg.connect(conninfo) as conn:
    with conn.cursor(name="srv") as cur:
        cur.execute("SELECT user_id, name FROM users WHERE user_id = ANY(%s) ORDER BY user_id", ([2000, 2002],))
        assert cur.fetchone() == (2000, "c2000")
        cur.scroll(0)
        assert cur.fetchall() == [(2002, "c2002")]
    conn.commit()
    print("server-side cursor")

# Before the first keyed statement: SAVEPOINT (a nested transaction block), SET LOCAL, then the statement.
with psycopg.connect(conninfo) as conn:
    with conn.transaction():
        conn.execute("SET LOCAL statement_timeout = '5s'")
        with conn.transaction():
            conn.execute("UPDATE users SET n = -1 WHERE user_id = %s", (2001,))
        try:
            with conn.transaction():
                conn.execute("UPDATE users SET n = -2 WHERE user_id = %s", (2001,))
                raise RuntimeError("rolled back to the savepoint")
        except RuntimeError:
            pass
    assert conn.execute("SELECT n FROM users WHERE user_id = 2001").fetchone() == (-1,)
    conn.commit()
    print("savepoints before the first statement")

# Two-phase commit of a transaction on one shard.
with psycopg.connect(conninfo) as conn:
    xid = conn.xid(1, "gtrid-router", "bq")
    conn.tpc_begin(xid)
    conn.execute("INSERT INTO users (user_id, name) VALUES (%s, 'tpc')", (3000,))
    conn.tpc_prepare()
    conn.tpc_commit()
    assert count(conn, "user_id = 3000") == 1
    conn.commit()
    xid = conn.xid(2, "gtrid-router-2", "bq")
    conn.tpc_begin(xid)
    conn.execute("INSERT INTO users (user_id, name) VALUES (%s, 'tpc')", (3001,))
    conn.tpc_prepare()
    conn.tpc_rollback()
    assert count(conn, "user_id = 3001") == 0
    conn.commit()
    print("two-phase commit")

# client_encoding: LATIN1 both ways, and the server's error for what LATIN1 cannot hold.
with psycopg.connect(conninfo, autocommit=True, client_encoding="latin1") as conn:
    assert conn.info.encoding == "iso8859-1", conn.info.encoding
    assert conn.info.parameter_status("client_encoding") == "LATIN1"
    conn.execute("INSERT INTO users (user_id, name) VALUES (%s, %s)", (4000, "café"))
    conn.execute("INSERT INTO users (user_id, name) VALUES (4001, 'naïve')")
    assert conn.execute("SELECT name FROM users WHERE user_id = 4000").fetchone() == ("café",)
    assert conn.execute("SELECT name FROM users WHERE user_id = 4001").fetchone() == ("naïve",)
with psycopg.connect(conninfo, autocommit=True) as conn:
    conn.execute("INSERT INTO users (user_id, name) VALUES (%s, %s)", (4002, "€"))
    assert conn.execute("SELECT name FROM users WHERE user_id = 4000").fetchone() == ("café",)
    conn.execute("SET client_encoding = 'LATIN1'")
    assert conn.info.encoding == "iso8859-1"
    try:
        conn.execute("SELECT name FROM users WHERE user_id = 4002").fetchone()
        raise AssertionError("a character LATIN1 cannot hold was sent")
    except errors.UntranslatableCharacter:
        pass
    print("client_encoding")

# ParameterStatus after SET reaches the client: psycopg reads dates by DateStyle.
with psycopg.connect(conninfo, autocommit=True) as conn:
    conn.execute("SET datestyle = SQL, YMD")
    assert conn.info.parameter_status("DateStyle") == "SQL, YMD", conn.info.parameter_status("DateStyle")
    assert conn.execute("SELECT '2000-01-02'::date").fetchone()[0] == datetime.date(2000, 1, 2)
    conn.execute("SET timezone = 'Asia/Tokyo'")
    assert conn.info.timezone.key == "Asia/Tokyo", conn.info.timezone
    # In a transaction, before any keyed statement.
    with conn.transaction():
        conn.execute("SET intervalstyle = 'iso_8601'")
        assert conn.execute("SELECT n FROM users WHERE user_id = 2000").fetchone() == (2000,)
    assert conn.info.parameter_status("IntervalStyle") == "iso_8601"
    print("parameter status")

# Notices reach the client.
with psycopg.connect(conninfo, autocommit=True) as conn:
    seen = []
    conn.add_notice_handler(lambda d: seen.append(d.message_primary))
    conn.execute("DO $$ BEGIN RAISE NOTICE 'hello from a shard'; END $$")
    assert "hello from a shard" in seen, seen
    print("notices")

print("ok")
