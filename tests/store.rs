//! Durable state as a user meets it: resuming a journal, surviving a kill, refusing unusable paths,
//! reading inputs with line numbers, repairing a torn output file.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout, clippy::print_stderr)]

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use batchagent::store::{InputError, InputFormat, InputReader, Journal, JournalError, JsonlSink, TornLine};
use proptest::prelude::*;
use serde_json::{json, Value};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ba-store-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

// ---------------------------------------------------------------- journal

#[test]
fn resume_skips_finished_jobs_and_restores_checkpoints() {
    let dir = temp_dir("resume");
    let path = dir.join("run.sqlite");
    {
        let j = Journal::open(&path, "fp-1", false).unwrap();
        for i in 0..10u64 {
            j.record_start(&format!("job-{i}"), i, &json!({"prompt": i}).to_string());
        }
        // Results arrive out of order, as they do from concurrent agents.
        for i in [8u64, 2, 6, 0, 4] {
            assert!(j.record_result(&format!("job-{i}"), i, &json!({"answer": i}).to_string()));
        }
        for i in [1u64, 3, 5] {
            j.record_turn(&format!("job-{i}"), 1, &format!("[\"turn 1 of {i}\"]"));
            j.record_turn(&format!("job-{i}"), 2, &format!("[\"turn 2 of {i}\"]"));
        }
        assert!(!j.record_result("job-2", 2, "{\"again\":true}"), "second result in the same session");
        j.flush().unwrap();
        assert_eq!(j.stats().duplicate_results, 1);
    }

    let j = Journal::open(&path, "fp-1", false).unwrap();
    let expected: HashSet<String> = [0, 2, 4, 6, 8].iter().map(|i| format!("job-{i}")).collect();
    assert_eq!(j.finished_ids().unwrap(), expected);
    assert_eq!(j.stats().previously_finished, 5);
    assert!(j.is_finished("job-4"));
    assert!(!j.is_finished("job-5"));
    assert!(!j.record_result("job-4", 4, "{\"answer\":\"dup\"}"), "a finished job's result is not re-recorded");

    for i in [1u64, 3, 5] {
        let cp = j.checkpoint(&format!("job-{i}"), i).expect("checkpoint");
        assert_eq!(cp.turn, 2);
        assert_eq!(cp.state_json, format!("[\"turn 2 of {i}\"]"));
    }
    assert_eq!(j.checkpoint("job-7", 7), None, "started, no turn recorded");
    assert_eq!(j.checkpoint("job-2", 2), None, "finished jobs do not resume");

    assert!(j.record_result("job-5", 5, "{\"answer\":5}"));
    let results: Vec<(u64, String)> = j.results().map(Result::unwrap).collect();
    let indices: Vec<u64> = results.iter().map(|(i, _)| *i).collect();
    assert_eq!(indices, vec![0, 2, 4, 5, 6, 8]);
    assert_eq!(results[1].1, "{\"answer\":2}", "the first result stays, the duplicate is dropped");
    assert_eq!(results[3].1, "{\"answer\":5}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn results_stream_in_index_order_across_pages() {
    let dir = temp_dir("pages");
    let path = dir.join("run.sqlite");
    let j = Journal::open(&path, "fp", false).unwrap();
    let n = 2_000u64;
    // Reverse order and ids that do not sort like their indices.
    for i in (0..n).rev() {
        assert!(j.record_result(&format!("{}", n - i), i, &format!("{{\"i\":{i}}}")));
    }
    let mut count = 0u64;
    for (expected, item) in j.results().enumerate() {
        let (index, result) = item.unwrap();
        assert_eq!(index, expected as u64);
        assert_eq!(result, format!("{{\"i\":{index}}}"));
        count += 1;
    }
    assert_eq!(count, n);
    drop(j);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fingerprint_mismatch_is_refused_naming_both() {
    let dir = temp_dir("fingerprint");
    let path = dir.join("run.sqlite");
    drop(Journal::open(&path, "aaaa1111", false).unwrap());
    let err = Journal::open(&path, "bbbb2222", false).err().expect("mismatch refused");
    let message = err.to_string();
    assert!(matches!(err, JournalError::Mismatch { .. }), "{message}");
    assert!(message.contains("aaaa1111") && message.contains("bbbb2222"), "{message}");
    assert!(message.contains(&path.display().to_string()), "{message}");
    let _ = std::fs::remove_dir_all(&dir);
}

// These tests run as root, and root ignores directory permission bits, so a chmod'ed read-only
// directory would still be writable. A path under a regular file (ENOTDIR) and a path under a
// missing directory (ENOENT) fail for every user, without chattr or mounts.
#[test]
fn unwritable_paths_fail_at_open_naming_path_and_reason() {
    let dir = temp_dir("unwritable");
    let file = write(&dir, "plain-file", "not a directory");
    let cases =
        [(file.join("run.sqlite"), "Not a directory"), (dir.join("missing").join("run.sqlite"), "No such file")];
    for (path, reason) in cases {
        let err = Journal::open(&path, "fp", false).err().expect("open must fail");
        let message = err.to_string();
        assert!(matches!(err, JournalError::Open { .. }), "{message}");
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains(reason), "{message}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn read_only_directory_fails_at_open_for_unprivileged_users() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("readonly");
    let ro = dir.join("ro");
    std::fs::create_dir(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    // Root writes anyway (see above); the check is only meaningful for other users.
    let privileged = std::fs::write(ro.join("probe"), b"").is_ok();
    if !privileged {
        let path = ro.join("run.sqlite");
        let message = Journal::open(&path, "fp", false).err().expect("open must fail").to_string();
        assert!(message.contains(&path.display().to_string()) && message.contains("ermission"), "{message}");
    }
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

const CRASH_ENV: &str = "BATCHAGENT_TEST_JOURNAL_CRASH";

/// The child side of `journal_survives_sigkill`: records results forever, reporting each flush, until
/// the parent kills it. Ignored in normal runs; without the variable it does nothing.
#[test]
#[ignore = "child process of journal_survives_sigkill"]
fn journal_crash_child() {
    let Some(path) = std::env::var_os(CRASH_ENV) else { return };
    let j = Journal::open(Path::new(&path), "crash", false).unwrap();
    for i in 0u64.. {
        let id = format!("job-{i}");
        j.record_start(&id, i, "{}");
        j.record_turn(&id, 1, &crash_state(i, 1));
        // Every third job stays unfinished: its checkpoint (blocks shared with the others) must
        // read back exactly after the kill.
        if i % 3 == 0 {
            j.record_turn(&id, 2, &crash_state(i, 2));
            continue;
        }
        j.record_result(&id, i, &format!("{{\"i\":{i}}}"));
        if i % 250 == 249 {
            j.flush().unwrap();
            println!("flushed {}", i + 1);
        }
    }
}

fn crash_state(job: u64, turn: u32) -> String {
    let prompt: String = (0..400).map(|w| format!("word{} ", w * 37 % 101)).collect::<Vec<_>>().concat();
    json!({"messages": [{"role": "system", "content": prompt}, {"role": "user", "content": format!("job {job}")},
                        {"role": "assistant", "content": format!("turn {turn} of job {job}")}], "turns": turn})
    .to_string()
}

#[test]
fn journal_survives_sigkill() {
    let dir = temp_dir("crash");
    let path = dir.join("run.sqlite");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["journal_crash_child", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CRASH_ENV, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut flushed = 0u64;
    for line in stdout.lines() {
        if let Some(n) = line.unwrap().strip_prefix("flushed ") {
            flushed = n.trim().parse().unwrap();
            if flushed >= 5_000 {
                break;
            }
        }
    }
    // SIGKILL while the child keeps writing: no destructor, no final commit.
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(flushed >= 5_000, "the child stopped early, after {flushed} flushed results");

    let j = Journal::open(&path, "crash", false).unwrap();
    let finished = j.finished_ids().unwrap();
    for i in (0..flushed).filter(|i| i % 3 != 0) {
        assert!(finished.contains(&format!("job-{i}")), "flushed result job-{i} lost");
    }
    let mut seen = HashSet::new();
    for item in j.results() {
        let (index, result) = item.unwrap();
        assert!(seen.insert(index), "result {index} twice");
        assert_eq!(result, format!("{{\"i\":{index}}}"));
    }
    assert_eq!(seen.len(), finished.len());
    for i in (0..flushed).step_by(3) {
        let checkpoint = j.checkpoint(&format!("job-{i}"), i).expect("flushed checkpoint lost");
        assert_eq!((checkpoint.turn, checkpoint.state_json), (2, crash_state(i, 2)), "job-{i}");
    }
    assert_eq!(j.stats().read_errors, 0);
    assert!(!j.record_result("job-1", 1, "{}"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn group_commit_throughput_sanity() {
    let dir = temp_dir("throughput");
    let path = dir.join("run.sqlite");
    let j = Journal::open(&path, "fp", false).unwrap();
    let n = 50_000u64;
    let started = Instant::now();
    for i in 0..n {
        let id = format!("job-{i}");
        j.record_start(&id, i, "{\"prompt\":\"Summarise the attached file in one sentence.\"}");
        j.record_result(&id, i, "{\"output\":\"A short answer of about the usual length.\"}");
    }
    j.flush().unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    eprintln!("journal: {n} jobs (start + result) in {elapsed:.2}s = {:.0} jobs/s", n as f64 / elapsed);
    let stats = j.stats();
    assert_eq!((stats.jobs_started, stats.jobs_finished, stats.write_errors), (n, n, 0));
    assert_eq!(j.finished_ids().unwrap().len() as u64, n);
    drop(j);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------- input

fn collect(path: &Path, format: InputFormat) -> Vec<Result<batchagent::store::InputRecord, InputError>> {
    InputReader::open(path, format).unwrap().collect()
}

#[test]
fn jsonl_bad_line_is_named_and_reading_goes_on() {
    let dir = temp_dir("jsonl");
    let path = write(
        &dir,
        "in.jsonl",
        "{\"id\": \"a\", \"q\": 1}\n\n{\"id\": 7, \"q\": 2}\n{\"id\": \"c\", \"q\": \n[1, 2]\n{\"q\": 5}\n",
    );
    let items = collect(&path, InputFormat::Auto);
    assert_eq!(items.len(), 5);
    let ok: Vec<_> = items.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(ok.iter().map(|r| (r.line, r.index)).collect::<Vec<_>>(), vec![(1, 0), (3, 1), (6, 4)]);
    assert_eq!(ok[0].id().as_deref(), Some("a"));
    assert_eq!(ok[1].fields["id"], json!(7), "a numeric id stays a number");
    assert_eq!(ok[1].id().as_deref(), Some("7"));
    assert_eq!(ok[2].id(), None);
    match &items[2] {
        Err(InputError::BadLine { line, index, message, .. }) => {
            assert_eq!((*line, *index), (4, 2));
            assert!(message.contains("invalid JSON"), "{message}");
        }
        other => panic!("expected a bad line 4, got {other:?}"),
    }
    match &items[3] {
        Err(e @ InputError::BadLine { line: 5, index: 3, .. }) => {
            let message = e.to_string();
            assert!(message.contains("line 5") && message.contains("an array"), "{message}");
            assert!(message.contains(&path.display().to_string()), "{message}");
        }
        other => panic!("expected a bad line 5, got {other:?}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn jsonl_line_3_of_5_malformed() {
    let dir = temp_dir("jsonl5");
    let path = write(&dir, "five.ndjson", "{\"n\":1}\n{\"n\":2}\n{\"n\":3\n{\"n\":4}\n{\"n\":5}");
    let items = collect(&path, InputFormat::Auto);
    let lines: Vec<Result<u64, u64>> = items
        .iter()
        .map(|r| match r {
            Ok(rec) => Ok(rec.line),
            Err(InputError::BadLine { line, .. }) => Err(*line),
            Err(e) => panic!("{e}"),
        })
        .collect();
    assert_eq!(lines, vec![Ok(1), Ok(2), Err(3), Ok(4), Ok(5)]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn text_lines_become_prompts() {
    let dir = temp_dir("text");
    let path =
        write(&dir, "prompts.txt", "\u{feff}first prompt\r\n\n   \nsecond, with \"quotes\"\nlast without newline");
    let items: Vec<_> = collect(&path, InputFormat::Auto).into_iter().map(Result::unwrap).collect();
    let prompts: Vec<(u64, u64, &str)> =
        items.iter().map(|r| (r.line, r.index, r.fields["prompt"].as_str().unwrap())).collect();
    assert_eq!(
        prompts,
        vec![(1, 0, "first prompt"), (4, 1, "second, with \"quotes\""), (5, 2, "last without newline")]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn csv_quoting_cases() {
    let dir = temp_dir("csv");
    let path = write(
        &dir,
        "in.csv",
        concat!(
            "\u{feff}id,text,note\r\n",
            "1,plain,x\r\n",
            "2,\"with, comma\",\"say \"\"hi\"\"\"\r\n",
            "3,\"two\nlines\",\"\"\n",
            "\n",
            "4,unquoted \"inner\" quote,\n",
            "5,too,many,fields\n",
            "6,\"bad\"x,y\n",
            "7,\"crlf\r\ninside\",end"
        ),
    );
    let items = collect(&path, InputFormat::Auto);
    assert_eq!(items.len(), 7);
    let rec = |i: usize| items[i].as_ref().unwrap();
    assert_eq!(
        rec(0).fields,
        serde_json::from_value::<serde_json::Map<String, Value>>(json!({"id": "1", "text": "plain", "note": "x"}))
            .unwrap()
    );
    assert_eq!(rec(1).fields["text"], "with, comma");
    assert_eq!(rec(1).fields["note"], "say \"hi\"");
    assert_eq!((rec(2).line, rec(2).fields["text"].as_str().unwrap()), (4, "two\nlines"));
    assert_eq!(rec(2).fields["note"], "");
    assert_eq!((rec(3).line, rec(3).index), (7, 3), "blank line skipped, lines still counted");
    assert_eq!(rec(3).fields["text"], "unquoted \"inner\" quote");
    match &items[4] {
        Err(InputError::BadLine { line: 8, index: 4, message, .. }) => {
            assert!(message.contains("4 field"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // Text after a closing quote is kept, as Python's csv module keeps it.
    assert_eq!((rec(5).line, rec(5).fields["text"].as_str().unwrap()), (9, "badx"));
    assert_eq!((rec(6).line, rec(6).fields["text"].as_str().unwrap()), (10, "crlf\r\ninside"));
    assert_eq!(rec(6).fields["note"], "end");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn csv_unterminated_quote_names_its_first_line() {
    let dir = temp_dir("csv-unclosed");
    let path = write(&dir, "in.csv", "a,b\n1,2\n3,\"never\nclosed\n");
    let items = collect(&path, InputFormat::Csv);
    assert_eq!(items.len(), 2);
    assert!(items[0].is_ok());
    match &items[1] {
        Err(InputError::BadLine { line: 3, message, .. }) => assert!(message.contains("never closed"), "{message}"),
        other => panic!("{other:?}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn csv_errors_name_the_line_a_record_starts_on() {
    let dir = temp_dir("csv-open");
    let path = dir.join("in.csv");
    std::fs::write(&path, b"a,b\r\n1,\"two\r\nlines\"\r\n2,\xff\r\n3\r\n").unwrap();
    let items = collect(&path, InputFormat::Csv);
    assert_eq!(items.len(), 3);
    assert_eq!(items[0].as_ref().unwrap().line, 2);
    match &items[1] {
        Err(InputError::BadLine { line: 4, index: 1, message, .. }) => assert!(message.contains("UTF-8"), "{message}"),
        other => panic!("{other:?}"),
    }
    match &items[2] {
        Err(InputError::BadLine { line: 5, index: 2, message, .. }) => {
            assert!(message.contains("1 field"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let dup = write(&dir, "dup.csv", "a,b,a\n1,2,3\n");
    let err = InputReader::open(&dup, InputFormat::Auto).err().expect("duplicate column refused");
    assert!(err.to_string().contains("\"a\" appears twice"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn auto_detection_picks_the_reader() {
    let dir = temp_dir("auto");
    let body = "{\"a\":1}\n";
    for (name, expected) in [("x.jsonl", json!(1)), ("x.txt", json!(null)), ("x.csv", json!(null))] {
        let path = write(&dir, name, body);
        let first = InputReader::open(&path, InputFormat::Auto).unwrap().next();
        match (name, first) {
            ("x.jsonl", Some(Ok(r))) => assert_eq!(r.fields["a"], expected),
            ("x.txt", Some(Ok(r))) => assert_eq!(r.fields["prompt"], "{\"a\":1}"),
            // The JSON line is the CSV header; there are no rows.
            ("x.csv", None) => {}
            (name, other) => panic!("{name}: {other:?}"),
        }
    }
    let missing = dir.join("absent.jsonl");
    let err = InputReader::open(&missing, InputFormat::Auto).err().expect("missing file");
    assert!(err.to_string().contains(&missing.display().to_string()), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn csv_field(value: &str) -> String {
    if value.contains([',', '"', '\n', '\r']) || value.is_empty() {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_owned()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn csv_round_trips_generated_rows(
        rows in prop::collection::vec(prop::collection::vec("[a-z ,\"\r\n\u{e9}\u{4e2d}]{0,12}", 3), 1..20),
        crlf in any::<bool>(),
    ) {
        let dir = temp_dir("csv-prop");
        let eol = if crlf { "\r\n" } else { "\n" };
        let mut text = format!("c0,c1,c2{eol}");
        for row in &rows {
            let fields: Vec<String> = row.iter().map(|f| csv_field(f)).collect();
            text.push_str(&fields.join(","));
            text.push_str(eol);
        }
        let path = write(&dir, "p.csv", &text);
        let read: Vec<_> = InputReader::open(&path, InputFormat::Csv).unwrap().map(Result::unwrap).collect();
        prop_assert_eq!(read.len(), rows.len());
        for (i, (record, row)) in read.iter().zip(&rows).enumerate() {
            prop_assert_eq!(record.index, i as u64);
            for (c, value) in row.iter().enumerate() {
                prop_assert_eq!(record.fields[&format!("c{c}")].as_str().unwrap(), value.as_str());
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

// ---------------------------------------------------------------- sink

#[test]
fn sink_repairs_torn_last_line_on_append() {
    let dir = temp_dir("sink");
    let path = dir.join("out.jsonl");
    {
        let sink = JsonlSink::create(&path, false).unwrap();
        sink.write_value(&json!({"index": 0, "output": "a"})).unwrap();
        sink.write_line("{\"index\":1,\"output\":\"b\"}").unwrap();
        sink.flush().unwrap();
    }
    let whole = std::fs::read_to_string(&path).unwrap();
    assert_eq!(whole.lines().count(), 2);
    // A crash in the middle of a write leaves half a record.
    std::fs::write(&path, format!("{whole}{{\"index\":2,\"out")).unwrap();

    let sink = JsonlSink::create(&path, true).unwrap();
    assert_eq!(sink.torn_line(), Some(&TornLine { offset: whole.len() as u64, len: 15 }));
    sink.write_value(&json!({"index": 2, "output": "c"})).unwrap();
    drop(sink);
    let text = std::fs::read_to_string(&path).unwrap();
    let values: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(values.iter().map(|v| v["index"].as_u64().unwrap()).collect::<Vec<_>>(), vec![0, 1, 2]);

    // A clean file is left alone; a new file is truncated on create.
    assert_eq!(JsonlSink::create(&path, true).unwrap().torn_line(), None);
    drop(JsonlSink::create(&path, false).unwrap());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------- journal checkpoints as diffs

#[derive(Debug, Clone)]
enum JournalOp {
    Turn { job: usize, turn: u32, words: usize },
    Result { job: usize },
    Reopen,
}

fn journal_op() -> impl Strategy<Value = JournalOp> {
    prop_oneof![
        6 => (0..4usize, 1..6u32, 0..300usize).prop_map(|(job, turn, words)| JournalOp::Turn { job, turn, words }),
        1 => (0..4usize).prop_map(|job| JournalOp::Result { job }),
        1 => Just(JournalOp::Reopen),
    ]
}

/// A state sharing a long prefix with every other job's, then the job's own growing tail.
fn diff_state(job: usize, turn: u32, words: usize) -> String {
    let shared: String = (0..600).map(|w| format!("s{} ", w * 7 % 97)).collect::<Vec<_>>().concat();
    let own: String = (0..words).map(|w| format!("j{job}w{w} ")).collect::<Vec<_>>().concat();
    json!({"messages": [{"role": "system", "content": shared}, {"role": "user", "content": own}], "turns": turn})
        .to_string()
}

fn block_rows(path: &Path) -> i64 {
    rusqlite::Connection::open(path).unwrap().query_row("SELECT count(*) FROM blocks", [], |r| r.get(0)).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Whatever the order of turns, results and reopenings, a checkpoint reads back as the last
    /// state recorded at the highest turn, and finished jobs leave no block behind.
    #[test]
    fn journal_checkpoints_match_a_model(ops in prop::collection::vec(journal_op(), 1..40)) {
        let dir = temp_dir("diff-model");
        let path = dir.join("run.sqlite");
        let mut j = Journal::open(&path, "fp", false).unwrap();
        let mut model: std::collections::HashMap<usize, (u32, String)> = std::collections::HashMap::new();
        let mut finished = HashSet::new();
        for job in 0..4 {
            j.record_start(&format!("j{job}"), job as u64, "{}");
        }
        for op in ops {
            match op {
                JournalOp::Turn { job, turn, words } => {
                    let state = diff_state(job, turn, words);
                    j.record_turn(&format!("j{job}"), turn, &state);
                    if !finished.contains(&job) && model.get(&job).is_none_or(|(t, _)| *t <= turn) {
                        model.insert(job, (turn, state));
                    }
                }
                JournalOp::Result { job } => {
                    prop_assert_eq!(j.record_result(&format!("j{job}"), job as u64, "{}"), finished.insert(job));
                    model.remove(&job);
                }
                JournalOp::Reopen => {
                    drop(j);
                    j = Journal::open(&path, "fp", false).unwrap();
                }
            }
        }
        j.flush().unwrap();
        for job in 0..4 {
            let got = j.checkpoint(&format!("j{job}"), job as u64).map(|c| (c.turn, c.state_json));
            prop_assert_eq!(got, model.get(&job).cloned(), "job {}", job);
        }
        prop_assert_eq!(j.stats().read_errors, 0);
        for job in 0..4 {
            j.record_result(&format!("j{job}"), job as u64, "{}");
        }
        j.flush().unwrap();
        prop_assert_eq!(block_rows(&path), 0);
        drop(j);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
