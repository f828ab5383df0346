//! `torch.sum` / `torch.mean` of a contiguous f32 vector on the CPU, reproduced in its order of
//! operations, because bitsandbytes' double-quantization offset is `absmax.mean()` and must
//! match bit for bit. PyTorch sums 8-lane vectors with 4-way ILP and a 4-level cascade, then the
//! scalar tail, then the lanes (checked against torch 2.15 on 344 random vectors; the fixtures
//! check it again). Above PyTorch's parallel grain (32768 values) torch splits the work across
//! threads, so its own result depends on the thread count; hone keeps the single-thread order.

const LANES: usize = 8;
const ILP: usize = 4;
const LEVELS: usize = 4;

type Lane = [f32; LANES];

fn add(a: &mut Lane, b: &Lane) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

fn ceil_log2(n: usize) -> usize {
    if n <= 1 {
        0
    } else {
        (usize::BITS - (n - 1).leading_zeros()) as usize
    }
}

/// Sums `rows` (`size` rows of `ILP` vectors) into `ILP` vectors with the cascade.
fn multi_row_sum(rows: &[[Lane; ILP]]) -> [Lane; ILP] {
    let size = rows.len();
    let level_power = 4.max(ceil_log2(size) / LEVELS);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[[0f32; LANES]; ILP]; LEVELS];
    let mut i = 0;
    while i + level_step <= size {
        for _ in 0..level_step {
            for k in 0..ILP {
                add(&mut acc[0][k], &rows[i][k]);
            }
            i += 1;
        }
        for j in 1..LEVELS {
            for k in 0..ILP {
                let lower = acc[j - 1][k];
                add(&mut acc[j][k], &lower);
                acc[j - 1][k] = [0.0; LANES];
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    while i < size {
        for k in 0..ILP {
            add(&mut acc[0][k], &rows[i][k]);
        }
        i += 1;
    }
    for j in 1..LEVELS {
        for k in 0..ILP {
            let upper = acc[j][k];
            add(&mut acc[0][k], &upper);
        }
    }
    acc[0]
}

/// `row_sum` over vectors: ILP groups through the cascade, then the leftover vectors.
fn row_sum(vectors: &[Lane]) -> Lane {
    let size_ilp = vectors.len() / ILP;
    let rows: Vec<[Lane; ILP]> = (0..size_ilp)
        .map(|r| std::array::from_fn(|k| vectors[r * ILP + k]))
        .collect();
    let mut partial = multi_row_sum(&rows);
    for v in &vectors[size_ilp * ILP..] {
        add(&mut partial[0], v);
    }
    let mut total = partial[0];
    for p in &partial[1..] {
        add(&mut total, p);
    }
    total
}

/// Scalar `row_sum` (inputs shorter than one vector): the same cascade on one lane.
fn scalar_row_sum(x: &[f32]) -> f32 {
    let vectors: Vec<Lane> = x.iter().map(|&v| std::array::from_fn(|l| if l == 0 { v } else { 0.0 })).collect();
    row_sum(&vectors)[0]
}

pub fn sum(x: &[f32]) -> f32 {
    if x.len() < LANES {
        return scalar_row_sum(x);
    }
    let n_vec = x.len() / LANES;
    let vectors: Vec<Lane> = (0..n_vec).map(|v| std::array::from_fn(|l| x[v * LANES + l])).collect();
    let lanes = row_sum(&vectors);
    let mut total = 0f32;
    for &v in &x[n_vec * LANES..] {
        total += v;
    }
    for l in lanes {
        total += l;
    }
    total
}

/// `torch.mean`: the sum divided by the count, in f32.
pub fn mean(x: &[f32]) -> f32 {
    sum(x) / x.len() as f32
}
