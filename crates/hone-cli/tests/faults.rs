//! `hone train` under faults: killed with SIGKILL at random moments (mid-step, mid-checkpoint,
//! mid-final save) and resumed each time, it ends with the adapter of a run never killed, bit
//! for bit on the CPU, never losing more than one checkpoint interval; a full disk (out of
//! inodes, or out of bytes) fails a save with a clear message, keeps the previous checkpoint,
//! and the run continues once there is room.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{fixtures, s, tmp, write_data};

/// The run every test repeats: dropout on, shuffled, a checkpoint after every step.
fn train_args(data: &Path, out: &Path, steps: usize) -> Vec<String> {
    let llama = fixtures().join("llama");
    [
        "train", "--model", s(&llama), "--data", s(data), "--out", s(out), "--rank", "2", "--alpha", "4", "--dropout", "0.1", "--lr", "0.03",
        "--batch-size", "2", "--seed", "3", "--save-every", "1", "--quiet", "--steps",
    ]
    .iter()
    .map(|a| a.to_string())
    .chain([steps.to_string()])
    .collect()
}

fn hone(args: &[String]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hone"));
    c.args(args);
    c
}

fn adapter_bytes(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    (std::fs::read(dir.join("adapter_config.json")).unwrap(), std::fs::read(dir.join("adapter_model.safetensors")).unwrap())
}

fn checkpoint_of(out: &Path) -> PathBuf {
    out.with_file_name(format!("{}.checkpoint", out.file_name().unwrap().to_string_lossy()))
}

/// The last "step N/M" line a run printed.
fn last_step(stderr: &str) -> Option<usize> {
    stderr.lines().filter_map(|l| l.strip_prefix("step ")?.split('/').next()?.parse().ok()).last()
}

/// Seeded kill times: a uniform draw in [0, 1).
fn unit(rng: &mut rand_chacha::ChaCha8Rng) -> f64 {
    use rand_chacha::rand_core::RngCore;
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

#[test]
fn sigkill_at_random_moments_then_resume_gives_the_uninterrupted_adapter() {
    const STEPS: usize = 60;
    const KILLS: usize = 20;
    let dir = tmp("kill");
    let data = write_data(&dir);
    // With held-out evaluations: the best adapter so far rides in the checkpoint.
    let args = |out: &Path, steps: usize| {
        let mut a = train_args(&data, out, steps);
        a.extend(["--eval-split", "0.25", "--eval-every", "7"].map(String::from));
        a
    };
    let timed = |out: &Path, steps: usize| {
        let t0 = Instant::now();
        let r = hone(&args(out, steps)).output().unwrap();
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        t0.elapsed()
    };
    let start_up = timed(&dir.join("one-step"), 1);
    let straight = dir.join("straight");
    let per_step = timed(&straight, STEPS).saturating_sub(start_up) / (STEPS as u32 - 1);
    // Kill times spread over start-up, steps and saves: a run gets through about a step on
    // average before its kill, so the kills come before the run can finish.
    let window = start_up + per_step * 2 + Duration::from_millis(5);

    let out = dir.join("killed");
    let ckpt = checkpoint_of(&out);
    let mut rng = <rand_chacha::ChaCha8Rng as rand_chacha::rand_core::SeedableRng>::seed_from_u64(21);
    let (mut kills, mut saved_step) = (0, 0usize);
    let mut resumed_at = Vec::new();
    for attempt in 0.. {
        assert!(attempt < 400, "the run never finished ({kills} kills)");
        // Killed after the adapter was written and the checkpoint removed: finished.
        if out.exists() && !ckpt.exists() {
            break;
        }
        let mut run = args(&out, STEPS);
        if ckpt.join("a/trainer_state.json").exists() || ckpt.join("b/trainer_state.json").exists() {
            run.extend(["--resume".to_string(), s(&ckpt).to_string()]);
        }
        let mut child = hone(&run).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        if kills < KILLS {
            std::thread::sleep(window.mul_f64(unit(&mut rng)));
            let _ = child.kill();
        }
        let Output { status, stderr, .. } = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&stderr).to_string();
        if let Some(at) = stderr.lines().find_map(|l| l.strip_prefix("resumed at step ")) {
            // At most one checkpoint interval (one step here) is lost to a kill.
            let at: usize = at.split_whitespace().next().unwrap().parse().unwrap();
            assert!(at + 1 >= saved_step, "resumed at step {at} after step {saved_step} was printed");
            resumed_at.push(at);
        }
        if let Some(step) = last_step(&stderr) {
            saved_step = step;
        }
        if status.success() {
            break;
        }
        assert!(status.code().is_none(), "a run failed without being killed: {stderr}");
        kills += 1;
        // Nothing half-written where a finished file is expected: the adapter is whole or absent.
        if out.exists() {
            let _ = adapter_bytes(&out);
            let files = hone::io::Dir(out.clone());
            hone::lora::peft::Adapter::read(&files).expect("a whole adapter");
        }
    }
    println!("{kills} kills; start-up {start_up:?}, {per_step:?} a step; resumed at steps {resumed_at:?}");
    assert!(kills >= KILLS, "only {kills} kills landed before the run finished");
    assert_eq!(adapter_bytes(&out), adapter_bytes(&straight), "the killed-and-resumed run's adapter differs");
    assert!(!ckpt.exists(), "the finished run leaves no checkpoint");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_full_disk_fails_the_save_clearly_and_the_run_continues_after_room_is_made() {
    let dir = tmp("enospc");
    let data = write_data(&dir);
    let straight = dir.join("straight");
    let r = hone(&train_args(&data, &straight, 3)).output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));

    // In a mount namespace of its own, a tmpfs whose inodes run out after the first
    // checkpoint (its directory and one slot), so the second save hits ENOSPC; then the fillers
    // go and the run resumes. Then a second tmpfs whose bytes run out the same way.
    let mnt = dir.join("mnt");
    let keep = dir.join("keep");
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::create_dir_all(&keep).unwrap();
    let out = mnt.join("adapter");
    let first = train_args(&data, &out, 3).join(" ");
    let resume = format!("{first} --resume {}", s(&checkpoint_of(&out)));
    let mnt2 = dir.join("mnt2");
    std::fs::create_dir_all(&mnt2).unwrap();
    let out2 = mnt2.join("adapter");
    let first2 = train_args(&data, &out2, 3).join(" ");
    let resume2 = format!("{first2} --resume {}", s(&checkpoint_of(&out2)));
    let hone_bin = env!("CARGO_BIN_EXE_hone");
    let script = format!(
        r#"set -u
# The run on the full disk, then its resume once the fillers are gone; what each leaves is kept
# under {keep}/ with the prefix $1. (Arguments: prefix, mount, run, resume, checkpoint, adapter.)
full_then_resumed() {{
  "{hone_bin}" $3 2> "{keep}/$1full.log"; echo $? > "{keep}/$1full.status"
  cp -r "$5" "{keep}/$1checkpoint"
  rm -f "$2"/filler*
  "{hone_bin}" $4 2> "{keep}/$1resumed.log"; echo $? > "{keep}/$1resumed.status"
  cp -r "$6" "{keep}/$1adapter"
}}
mount -t tmpfs -o size=16m,nr_inodes=64 tmpfs "{mnt}" || exit 90
i=0; while touch "{mnt}/filler$i" 2>/dev/null; do i=$((i+1)); done
# Room for the checkpoint's directory and one slot (a directory and 5 files) and 2 more.
for j in 1 2 3 4 5 6 7 8 9; do i=$((i-1)); rm "{mnt}/filler$i"; done
full_then_resumed "" "{mnt}" "{first}" "{resume}" "{ckpt}" "{out}"
# Then out of bytes rather than inodes: a tmpfs filled to the last page, then room made for the
# checkpoint of step 1 (as large as the one kept above) and half of one more.
mount -t tmpfs -o size=16m tmpfs "{mnt2}" || exit 91
cat /dev/zero > "{mnt2}/filler" 2>/dev/null
room=$(( $(du -sk "{keep}/checkpoint" | cut -f1) * 3 / 2 ))
truncate -s -${{room}}K "{mnt2}/filler" || exit 92
full_then_resumed bytes- "{mnt2}" "{first2}" "{resume2}" "{ckpt2}" "{out2}"
"#,
        mnt = s(&mnt),
        mnt2 = s(&mnt2),
        keep = s(&keep),
        ckpt = s(&checkpoint_of(&out)),
        ckpt2 = s(&checkpoint_of(&out2)),
        out = s(&out),
        out2 = s(&out2),
    );
    let r = Command::new("unshare").args(["--mount", "--map-root-user", "bash", "-c", &script]).output().expect("unshare (util-linux)");
    assert!(r.status.success(), "the namespace script failed ({:?}): {}", r.status.code(), String::from_utf8_lossy(&r.stderr));

    let read = |name: &str| std::fs::read_to_string(keep.join(name)).unwrap();
    // Either way: the save at step 2 fails by name, the step-1 checkpoint is left whole, and the
    // resumed run ends with the uninterrupted run's adapter. The failed run's log, for more.
    let full_then_resumed = |prefix: &str| -> String {
        let full = read(&format!("{prefix}full.log"));
        assert_eq!(read(&format!("{prefix}full.status")).trim(), "1", "{full}");
        assert!(full.contains("saving the checkpoint at step 2 failed") && full.contains("No space left on device") && full.contains("the previous checkpoint (step 1)"), "{full}");
        assert_eq!(hone::train::checkpoint::load(&keep.join(format!("{prefix}checkpoint"))).unwrap().saved.state.step, 1);
        let resumed = read(&format!("{prefix}resumed.log"));
        assert_eq!(read(&format!("{prefix}resumed.status")).trim(), "0", "{resumed}");
        assert!(resumed.contains("resumed at step 1 of 3"), "{resumed}");
        assert_eq!(adapter_bytes(&keep.join(format!("{prefix}adapter"))), adapter_bytes(&straight), "{prefix}: the resumed run's adapter differs");
        full
    };
    let full = full_then_resumed("");
    assert!(full.contains("is intact: free space and continue with --resume"), "{full}");
    // The same, out of bytes.
    full_then_resumed("bytes-");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `cp -r`, for saving and restoring a checkpoint directory.
fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    assert!(Command::new("cp").args(["-r", s(from), s(to)]).status().unwrap().success());
}

#[test]
fn states_a_kill_leaves_around_the_final_save_resume_to_the_same_adapter() {
    let dir = tmp("final");
    let data = write_data(&dir);
    let straight = dir.join("straight");
    assert!(hone(&train_args(&data, &straight, 4)).status().unwrap().success());

    // A checkpoint of step 3 of 4: the run is killed as soon as its slot is whole.
    let out = dir.join("killed");
    let ckpt = checkpoint_of(&out);
    let kept = dir.join("kept-checkpoint");
    for attempt in 0.. {
        assert!(attempt < 20, "never caught the step-3 checkpoint before the run ended");
        let _ = std::fs::remove_dir_all(&out);
        let _ = std::fs::remove_dir_all(&ckpt);
        let mut child = hone(&train_args(&data, &out, 4)).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(30) && !hone::train::checkpoint::load(&ckpt).is_ok_and(|l| l.saved.state.step == 3) {
            if child.try_wait().unwrap().is_some() {
                break;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        if hone::train::checkpoint::load(&ckpt).is_ok_and(|l| l.saved.state.step == 3) && !out.exists() {
            copy_dir(&ckpt, &kept);
            break;
        }
    }
    let resume = |out: &Path| {
        let mut args = train_args(&data, out, 4);
        args.extend(["--resume".to_string(), s(&checkpoint_of(out)).to_string()]);
        let r = hone(&args).output().unwrap();
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        assert!(String::from_utf8_lossy(&r.stderr).contains("resumed at step 3 of 4"));
    };

    // Killed after the adapter was renamed into place but before the checkpoint was removed.
    copy_dir(&straight, &out);
    resume(&out);
    assert_eq!(adapter_bytes(&out), adapter_bytes(&straight));
    assert!(!ckpt.exists());

    // Killed between the two renames of replacing an adapter: no adapter, the previous one and
    // the new one under temporary names. Resumed: the adapter is whole, the temporaries gone.
    copy_dir(&kept, &ckpt);
    std::fs::remove_dir_all(&out).unwrap();
    for junk in [".killed.tmp-99999", ".killed.old-99999"] {
        std::fs::create_dir_all(dir.join(junk)).unwrap();
        std::fs::write(dir.join(junk).join("adapter_model.safetensors"), b"half").unwrap();
    }
    resume(&out);
    assert_eq!(adapter_bytes(&out), adapter_bytes(&straight));
    for junk in [".killed.tmp-99999", ".killed.old-99999"] {
        assert!(!dir.join(junk).exists(), "{junk} left behind");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
