"""psycopg 3's AsyncConnection through shard-router (tests/tests/router_psycopg.rs): the failures of one
state machine per protocol path, in asyncio — a transaction bound to every shard committed through the
extended protocol, SET gb.shard_key through it, COMMIT after a refused statement, an error in a pipeline,
COPY in a transaction, a server-side cursor.

Usage: python3 psycopg_async.py "host=... port=... user=postgres dbname=postgres"
The table users (user_id bigint primary key, name text, n int) and the global table bots (id int primary key,
name text) exist. Prints "ok" at the end; any failure raises.
"""
import asyncio
import sys

import psycopg
from psycopg import errors

conninfo = sys.argv[1]


async def total(conn, sql, params=()):
    cur = await conn.execute(sql, params)
    return sum(r[0] for r in await cur.fetchall())


async def main():
    # prepare_threshold=0: every statement, BEGIN and COMMIT included, through named prepared statements.
    async with await psycopg.AsyncConnection.connect(conninfo, prepare_threshold=0) as conn:
        await conn.execute("BEGIN")
        await conn.execute("INSERT INTO bots (id, name) VALUES (%s, 'async')", (7,))
        await conn.execute("COMMIT")
        assert await total(conn, "SELECT count(*) FROM bots WHERE id = 7") >= 1
        await conn.commit()
        await conn.execute("SET gb.shard_key = 5001")
        await conn.execute("INSERT INTO users (user_id, name) VALUES (5001, 'a')")
        cur = await conn.execute("UPDATE users SET name = 'gb' WHERE name = 'a'")
        assert cur.rowcount == 1, cur.rowcount
        await conn.execute("RESET gb.shard_key")
        await conn.commit()
        # A transaction on two shards commits on both (two-phase commit); a failed one, on neither.
        await conn.execute("INSERT INTO users (user_id, name) VALUES (5002, 'x')")
        await conn.execute("INSERT INTO users (user_id, name) VALUES (5003, 'y')")
        await conn.commit()
        assert await total(conn, "SELECT count(*) FROM users WHERE user_id IN (5002, 5003)") == 2
        await conn.commit()
        await conn.execute("INSERT INTO users (user_id, name) VALUES (5004, 'x')")
        try:
            await conn.execute("INSERT INTO users (user_id, name) VALUES (5003, 'again')")
            raise AssertionError("a duplicate key was accepted")
        except errors.UniqueViolation:
            pass
        await conn.rollback()
        assert await total(conn, "SELECT count(*) FROM users WHERE user_id = 5004") == 0
        await conn.commit()

    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        async with conn.pipeline() as p:
            c1 = await conn.execute("select 1")
            try:
                await conn.execute("select * from doesnotexist")
                await p.sync()
            except errors.UndefinedTable:
                pass
            c2 = await conn.execute("select 2")
        assert await c1.fetchone() == (1,)
        assert await c2.fetchone() == (2,)

    async with await psycopg.AsyncConnection.connect(conninfo) as conn:
        async with conn.cursor() as cur:
            async with cur.copy("COPY users (user_id, name, n) FROM STDIN") as copy:
                for k in range(5100, 5110):
                    await copy.write_row((k, f"a{k}", k))
        await conn.commit()
        async with conn.cursor(name="asrv") as cur:
            await cur.execute("SELECT n FROM users WHERE user_id = %s", (5104,))
            assert await cur.fetchall() == [(5104,)]
        await conn.commit()
        assert await total(conn, "SELECT count(*) FROM users WHERE user_id BETWEEN 5100 AND 5109") == 10
    print("ok")


asyncio.run(main())
