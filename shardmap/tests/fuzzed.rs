//! Regressions found by fuzzing the planner (`fuzz/fuzz_targets/planner.rs`): each input once made the
//! simple protocol (literals taken out into a shape) and Parse/Bind decide differently, or panicked. The
//! inputs are also kept in `fuzz/regressions/planner/`, which every fuzz run replays.

use std::sync::Arc;

use shardmap::{Config, NoParams, Planner, Session, ShardMap, Target};

const BIGINT: &str = "shard-strategy,hash\nshard-count,4\nshard-key,user_id\nshard-algorithm,modulo\nshard-global-tables,bots,tools\nshard-table-users,id\n";
const UUID: &str = "shard-strategy,hash\nshard-count,3\nshard-key,user_id\nshard-key-type,uuid\nshard-algorithm,hash-buckets\nshard-global-tables,bots\n";
const TEXT: &str =
    "shard-strategy,hash\nshard-count,2\nshard-key,user_id\nshard-key-type,text\nshard-algorithm,hash-buckets\n";
const RANGE: &str = "shard-strategy,range\nshard-key,user_id\nshard-ranges,0-999:a,1000-1999:b,2000-:c\n";

fn planner(config: &str) -> Planner {
    Planner::new(Arc::new(ShardMap::new(&Config::parse("t.csv", config.as_bytes()).unwrap()).unwrap()))
}

/// Both protocol paths take the same decision (or both refuse); the decision's target.
fn agree(p: &Planner, sql: &str) -> Option<Target> {
    let session = Session::default();
    let simple = p.decide_simple(sql, &session);
    let extended = p.decide(sql, &NoParams, &session);
    match (&simple, &extended) {
        (Ok(s), Ok(e)) => {
            assert_eq!(s.target, e.target, "{sql:?}");
            Some(s.target.clone())
        }
        (Err(_), Err(_)) => None,
        _ => panic!("{sql:?}: simple {simple:?}, extended {extended:?}"),
    }
}

#[test]
fn negative_numbers_under_a_text_key_are_text() {
    let p = planner(TEXT);
    assert!(matches!(agree(&p, "SELECT * FROM users WHERE user_id = -0.5e3"), Some(Target::One(_))));
    assert!(matches!(agree(&p, "SELECT * FROM users WHERE user_id = -7"), Some(Target::One(_))));
}

#[test]
fn a_literal_that_is_no_key_matters_only_for_sharded_tables() {
    let p = planner(UUID);
    // A global table's column of the key's name, compared with a number: any shard answers, as PostgreSQL.
    assert_eq!(agree(&p, "SELECT * FROM bots WHERE user_id = 42"), Some(Target::Any));
    assert_eq!(
        agree(&p, "SELECT *selefigessage_history WHERE user_id = 42 AND created_at > now() - interval '1 day'"),
        Some(Target::Any)
    );
    // On a sharded table it cannot be a uuid key: refused on both paths.
    assert_eq!(agree(&p, "SELECT * FROM users WHERE user_id = 42"), None);
}

#[test]
fn literals_run_into_the_next_word_are_not_shaped() {
    let p = planner(TEXT);
    // 'x'q would become $100001q, a placeholder the parser reads as a word: the text is parsed as sent.
    assert_eq!(agree(&p, "SELECT * FROM users WHERE user_id = 'a0eecetafllbc99-9c0j-4ef8-bb6d-5bb9bd380a11'q"), None);
    let p = planner(BIGINT);
    assert_eq!(agree(&p, "SELECT insert* FROM userus1r_id, naH0.5e3"), None);
    let p = planner(RANGE);
    // Not one number: left in the text, whatever the parser then makes of it (the shards' own syntax error).
    agree(&p, "SELECT * FROM users WHERE user_id = -0..e3");
    agree(&p, "SELECT * FROM users WHERE user_id = 1.2.3");
}

#[test]
fn words_after_multibyte_characters() {
    let p = planner(RANGE);
    // Panicked: a byte index inside 'ߌ' when looking for the word before a string.
    agree(
        &p,
        "SELECT * FROM (users d) WHE user_sessionsߌ߰N '%.user_id =.us uer_id) WHERE ߰N %.user_id =.us u.user_id = 4.",
    );
    agree(&p, "SELECT * FROM users WHERE user_id = ünï'x'");
}

/// `ANY(21)` is a scalar where `ANY($1)` takes an array: a literal there is not taken out into a shape.
#[test]
fn any_of_a_number_is_not_any_of_a_placeholder() {
    let p = planner(UUID);
    agree(&p, "SELECT * DELETE FROM messages WHERE user_id = ANY(21)");
    agree(&p, "SELECT * FROM messages WHERE user_id = ANY(21)");
    agree(&p, "SELECT * FROM messages WHERE user_id = some ( 21 )");
    let p = planner(BIGINT);
    agree(&p, "SELECT * FROM messages WHERE user_id = ANY(21)");
    assert_eq!(agree(&p, "SELECT * FROM messages WHERE user_id = ANY('{21,22}')"), Some(Target::All));
}

/// A literal that cannot be a key matters only where it places the statement, as a literal the simple
/// protocol takes out: one in a CTE that does not decide where the statement goes is no refusal; one that
/// does is refused (22023) on both paths.
#[test]
fn a_bad_literal_refuses_only_where_it_places_the_statement() {
    let p = planner(UUID);
    assert_eq!(agree(&p, "WITH d AS (SELECT * FRsers WHERE user_id = 3) SELECT * FROM t"), Some(Target::All));
    assert_eq!(agree(&p, "SELECT * FROM t WHERE user_id = 3"), None);
    let e = p.decide("SELECT * FROM t WHERE user_id = 3", &NoParams, &Session::default()).unwrap_err();
    assert_eq!(e.sqlstate(), "22023", "{e}");
}

/// A comment-like text inside a string literal is no hint: `'... /* shard: ... */ ...'` is data.
#[test]
fn a_hint_inside_a_string_is_data() {
    let p = planner(TEXT);
    let sql = "SELECT * FROM users WHERE user_id = 'a\u{7}\u{3}/* tenant: &acme nant: /eL Sn UEt:PDATE\u{7}\u{3}/* `enant: Et: UPDA(TE\u{7}\u{3}/* `enacq*/*AA6d'";
    agree(&p, sql);
    // Data that looks like a hint does not move a row; a real hint still places the statement.
    let p = planner(BIGINT);
    let session = Session::default();
    let keyed = p.decide("INSERT INTO messages (user_id, body) VALUES (5, 'see /* shard: 0 */')", &NoParams, &session);
    assert_eq!(keyed.unwrap().target, Target::One(shardmap::ShardId(1)));
    let quoted =
        p.decide("SELECT \"/* shard: 0 */\", $x$ /* shard: 0 */ $x$ FROM bots -- /* shard: 0 */", &NoParams, &session);
    assert_eq!(quoted.unwrap().target, Target::Any);
    let hinted = p.decide("/* shard: 2 */ SELECT * FROM messages", &NoParams, &session).unwrap();
    assert_eq!(hinted.target, Target::One(shardmap::ShardId(2)));
    let escaped = p.decide(r"SELECT * FROM bots WHERE name = E'it\'s /* shard: 0 */'", &NoParams, &session);
    assert_eq!(escaped.unwrap().target, Target::Any);
}
