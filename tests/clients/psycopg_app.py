"""A small chat-bot workload in psycopg 3, run through shard-router by tests/tests/router_psycopg.rs.

Usage: python3 psycopg_app.py "host=127.0.0.1 port=... user=postgres dbname=postgres"
Prints one line per check and "ok" at the end; any failure raises.
"""
import sys
import uuid

import psycopg

conninfo = sys.argv[1]

with psycopg.connect(conninfo, autocommit=True) as conn:
    conn.execute("CREATE TABLE sessions (user_id bigint, id uuid, title text, PRIMARY KEY (user_id, id))")

with psycopg.connect(conninfo) as conn:  # psycopg opens a transaction for the first statement
    with conn.cursor() as cur:
        for user in range(1, 13):
            cur.execute(
                "INSERT INTO sessions (user_id, id, title) VALUES (%s, %s, %s)",
                (user, uuid.uuid4(), f"t{user}"),
            )
            conn.commit()
        print("inserted")

        # Server-side parameters in binary format, and a prepared statement used several times.
        for user in (1, 2, 3, 4, 5):
            cur.execute("SELECT title FROM sessions WHERE user_id = %b", (user,), prepare=True, binary=True)
            assert cur.fetchone()[0] == f"t{user}"
            conn.commit()
        print("prepared")

        # A read with no key goes to every shard.
        cur.execute("SELECT count(*) FROM sessions")
        counts = [r[0] for r in cur.fetchall()]
        assert sum(counts) == 12, counts
        conn.rollback()
        print("fan-out", counts)

with psycopg.connect(conninfo, autocommit=True) as conn:
    # executemany outside a transaction: one pipeline whose statements go to different shards.
    with conn.cursor() as cur:
        cur.executemany("UPDATE sessions SET title = %s WHERE user_id = %s", [("x1", 1), ("x2", 2), ("x3", 3)])
        cur.execute("SELECT title FROM sessions WHERE user_id = ANY(%s) ORDER BY user_id", ([1, 2, 3],))
        assert [r[0] for r in cur.fetchall()] == ["x1", "x2", "x3"]
    print("executemany")
    # DEALLOCATE ALL (psycopg sends it when it resets its prepared statements) is the router's to answer.
    conn.execute("DEALLOCATE ALL")
    # An explicit transaction on one shard.
    with conn.transaction():
        conn.execute("UPDATE sessions SET title = 'changed' WHERE user_id = %s", (7,))
    row = conn.execute("SELECT title FROM sessions WHERE user_id = %s", (7,)).fetchone()
    assert row[0] == "changed", row
    # A transaction on two shards commits on both (two-phase commit)...
    with conn.transaction():
        conn.execute("UPDATE sessions SET title = 'both' WHERE user_id = %s", (8,))
        conn.execute("UPDATE sessions SET title = 'both' WHERE user_id = %s", (9,))
    rows = conn.execute("SELECT title FROM sessions WHERE user_id = ANY(%s) ORDER BY user_id", ([8, 9],)).fetchall()
    assert [r[0] for r in rows] == ["both", "both"], rows
    # ... and an error on one of them rolls both back.
    try:
        with conn.transaction():
            conn.execute("UPDATE sessions SET title = 'no' WHERE user_id = %s", (8,))
            conn.execute("SELECT 1 / 0 FROM sessions WHERE user_id = %s", (9,))
        raise AssertionError("a failed transaction committed")
    except psycopg.errors.DivisionByZero:
        print("rolled back")
    row = conn.execute("SELECT title FROM sessions WHERE user_id = %s", (8,)).fetchone()
    assert row[0] == "both", row
    # COPY FROM STDIN through the router, rows split by key.
    with conn.cursor() as cur:
        with cur.copy("COPY sessions (user_id, id, title) FROM STDIN") as copy:
            for user in range(100, 110):
                copy.write_row((user, uuid.uuid4(), f"c{user}"))
    n = conn.execute("SELECT count(*) FROM sessions WHERE user_id = %s", (105,)).fetchone()[0]
    assert n == 1, n
    print("copy")

print("ok")
