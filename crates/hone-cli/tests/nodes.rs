//! `hone train --nodes`: data parallelism across processes talking over loopback, as hosts do
//! over a network. Two processes give the adapter of one run with their joint batch; a killed
//! node stops the other with an error naming it, quickly; a resume gives the uninterrupted run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{fixtures, s, tmp, write_data};

/// A port free now (the OS's pick), for node 0 to listen on.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Run {
    dir: PathBuf,
    data: PathBuf,
    steps: usize,
}

impl Run {
    fn args(&self, out: &str, extra: &[&str]) -> Vec<String> {
        let llama = fixtures().join("llama");
        let steps = self.steps.to_string();
        let mut args: Vec<String> = ["train", "--model", s(&llama), "--data", s(&self.data), "--out", s(&self.dir.join(out)), "--rank", "4", "--alpha", "8", "--steps", &steps, "--lr", "0.01", "--dropout", "0", "--quiet"].iter().map(|a| a.to_string()).collect();
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    }

    fn spawn(&self, out: &str, extra: &[&str]) -> Child {
        Command::new(env!("CARGO_BIN_EXE_hone")).args(self.args(out, extra)).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    }

    fn alone(&self, out: &str, extra: &[&str]) -> PathBuf {
        let r = Command::new(env!("CARGO_BIN_EXE_hone")).args(self.args(out, extra)).output().unwrap();
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        self.dir.join(out)
    }

    /// `nodes` processes, each with `extra` and its node flags; waits for all.
    fn nodes(&self, out: &str, nodes: usize, extra: &[&str]) -> Vec<Output> {
        let address = format!("127.0.0.1:{}", free_port());
        let n = nodes.to_string();
        let children: Vec<Child> = (0..nodes)
            .map(|k| {
                let rank = k.to_string();
                let out = if k == 0 { out.to_string() } else { format!("{out}-node{k}") };
                let mut e = extra.to_vec();
                e.extend(["--nodes", &n, "--node-rank", &rank, "--orchestrator", &address, "--peer-timeout", "60"]);
                self.spawn(&out, &e)
            })
            .collect();
        children.into_iter().map(|c| c.wait_with_output().unwrap()).collect()
    }
}

fn tensors(path: &Path) -> hone::io::safetensors::SafeTensors {
    hone::io::safetensors::SafeTensors::open(Box::new(hone::io::FileSource::open(&path.join("adapter_model.safetensors")).unwrap())).unwrap()
}

/// The worst relative error of `b`'s tensors against `a`'s, and whether `a` trained at all.
fn worst(a: &Path, b: &Path) -> (f64, bool) {
    let (a, b) = (tensors(a), tensors(b));
    let (mut err, mut moved) = (0f64, false);
    for name in a.tensors().keys().cloned().collect::<Vec<_>>() {
        let (_, x) = a.read_f32(&name).unwrap();
        let (_, y) = b.read_f32(&name).unwrap();
        moved |= name.contains("lora_B") && x.iter().any(|&v| v != 0.0);
        err = err.max(hone::parity::rel_error(&y, &x) as f64);
    }
    (err, moved)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn two_processes_train_the_adapter_of_one_run_with_their_joint_batch() {
    let dir = tmp("nodes");
    let run = Run { data: write_data(&dir), dir: dir.clone(), steps: 4 };
    let alone = run.alone("alone", &["--batch-size", "4"]);
    // 2 nodes × 1 peer × batch 2, and 2 nodes × 2 peers (threads) × batch 1.
    for (name, extra) in [("two", vec!["--batch-size", "2"]), ("four", vec!["--batch-size", "1", "--data-parallel", "2"])] {
        let outs = run.nodes(name, 2, &extra);
        for (k, o) in outs.iter().enumerate() {
            assert!(o.status.success(), "node {k}: {}", stderr(o));
        }
        assert!(stderr(&outs[1]).contains("node 0 writes the adapter"), "{}", stderr(&outs[1]));
        assert!(!dir.join(format!("{name}-node1")).exists(), "only node 0 writes");
        let (err, moved) = worst(&alone, &dir.join(name));
        println!("{name}: worst relative error {err:.2e} against one peer with batch 4");
        assert!(moved, "the adapter trained");
        assert!(err < 1e-5, "{name}: {err:.3e}");
    }
    // Nodes that do not agree are refused by name: other settings, a missing node.
    let address = format!("127.0.0.1:{}", free_port());
    let a = run.spawn("mismatch", &["--nodes", "2", "--node-rank", "0", "--orchestrator", &address, "--peer-timeout", "60"]);
    let b = run.spawn("mismatch-1", &["--nodes", "2", "--node-rank", "1", "--orchestrator", &address, "--peer-timeout", "60", "--seed", "7"]);
    for o in [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()] {
        assert!(!o.status.success() && stderr(&o).contains("peer 1 (node 1, 127.0.0.1:") && stderr(&o).contains("other settings or data"), "{}", stderr(&o));
    }
    let started = Instant::now();
    let r = Command::new(env!("CARGO_BIN_EXE_hone")).args(run.args("lonely", &["--nodes", "2", "--node-rank", "0", "--orchestrator", &format!("127.0.0.1:{}", free_port()), "--peer-timeout", "2"])).output().unwrap();
    assert!(!r.status.success() && stderr(&r).contains("peer 1 (node 1) never connected within 2s"), "{}", stderr(&r));
    assert!(started.elapsed() < Duration::from_secs(30));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_killed_node_stops_the_other_naming_it_and_a_resume_gives_the_uninterrupted_adapter() {
    let dir = tmp("nodes-kill");
    let run = Run { data: write_data(&dir), dir: dir.clone(), steps: 120 };
    // The run never killed: two nodes, straight through.
    for (k, o) in run.nodes("straight", 2, &["--batch-size", "2"]).iter().enumerate() {
        assert!(o.status.success(), "node {k}: {}", stderr(o));
    }
    let straight = dir.join("straight");
    let address = format!("127.0.0.1:{}", free_port());
    let node = |k: usize, extra: &[&str]| {
        let rank = k.to_string();
        let mut e = vec!["--batch-size", "2", "--save-every", "5", "--nodes", "2", "--node-rank", &rank, "--orchestrator", &address, "--peer-timeout", "60"];
        e.extend(extra);
        run.spawn(if k == 0 { "killed" } else { "killed-node1" }, &e)
    };
    let zero = node(0, &[]);
    let mut one = node(1, &[]);
    // Kill node 1 once node 0 has saved a checkpoint (a few steps in, far from the end).
    let checkpoint = dir.join("killed.checkpoint");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !checkpoint.exists() {
        assert!(Instant::now() < deadline, "no checkpoint appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
    one.kill().unwrap();
    let killed_at = Instant::now();
    let o = zero.wait_with_output().unwrap();
    let took = killed_at.elapsed();
    let err = stderr(&o);
    println!("node 0 stopped {took:?} after node 1 was killed: {}", err.lines().last().unwrap_or(""));
    assert!(!o.status.success(), "node 0 went on: {err}");
    assert!(err.contains("lost peer 1 (node 1, 127.0.0.1:") && err.contains("the connection closed"), "{err}");
    // Well within --peer-timeout: a closed connection is noticed at once.
    assert!(took < Duration::from_secs(30), "{took:?}");
    let _ = one.wait();
    // A node that stops answering without closing its connection (stopped, or the network
    // dropped): the other gives up after --peer-timeout, naming it.
    let address = format!("127.0.0.1:{}", free_port());
    let stalled = |k: usize| {
        let rank = k.to_string();
        run.spawn(&format!("stalled-{k}"), &["--batch-size", "2", "--save-every", "5", "--nodes", "2", "--node-rank", &rank, "--orchestrator", &address, "--peer-timeout", "3"])
    };
    let (zero, mut one) = (stalled(0), stalled(1));
    while !dir.join("stalled-0.checkpoint").exists() {
        assert!(Instant::now() < deadline, "no checkpoint appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(Command::new("kill").args(["-STOP", &one.id().to_string()]).status().unwrap().success());
    let stopped_at = Instant::now();
    let o = zero.wait_with_output().unwrap();
    let took = stopped_at.elapsed();
    let _ = one.kill();
    let _ = one.wait();
    let err = stderr(&o);
    println!("node 0 stopped {took:?} after node 1 stalled: {}", err.lines().last().unwrap_or(""));
    assert!(!o.status.success() && err.contains("lost peer 1 (node 1, 127.0.0.1:") && err.contains("no answer within 3s"), "{err}");
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(30), "{took:?}");
    // A node resuming alone (the other afresh) is refused by name.
    let resume = ["--resume", s(&checkpoint)];
    let address2 = format!("127.0.0.1:{}", free_port());
    let spawn2 = |k: usize, extra: &[&str]| {
        let rank = k.to_string();
        let mut e = vec!["--batch-size", "2", "--save-every", "5", "--nodes", "2", "--node-rank", &rank, "--orchestrator", &address2, "--peer-timeout", "60"];
        e.extend(extra);
        run.spawn(if k == 0 { "killed" } else { "killed-node1-afresh" }, &e)
    };
    let (a, b) = (spawn2(0, &resume), spawn2(1, &[]));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(!a.status.success() && stderr(&a).contains("peer 1 (node 1, 127.0.0.1:") && stderr(&a).contains("starts at step 0"), "{}", stderr(&a));
    assert!(!b.status.success(), "{}", stderr(&b));
    // Both resume from node 0's checkpoint: the adapter of the run never killed.
    let address3 = format!("127.0.0.1:{}", free_port());
    let children: Vec<Child> = (0..2)
        .map(|k| {
            let rank = k.to_string();
            let e = ["--batch-size", "2", "--save-every", "5", "--nodes", "2", "--node-rank", &rank, "--orchestrator", &address3, "--peer-timeout", "60", "--resume", s(&checkpoint)];
            run.spawn(if k == 0 { "killed" } else { "killed-node1" }, &e)
        })
        .collect();
    for (k, c) in children.into_iter().enumerate() {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "node {k}: {}", stderr(&o));
        assert!(stderr(&o).contains("resumed at step"), "{}", stderr(&o));
    }
    let (err, moved) = worst(&straight, &dir.join("killed"));
    println!("killed and resumed: worst relative error {err:.2e} against the run never killed");
    assert!(moved, "the adapter trained");
    assert_eq!(err, 0.0, "the resumed run differs from the run never killed");
    let _ = std::fs::remove_dir_all(&dir);
}
