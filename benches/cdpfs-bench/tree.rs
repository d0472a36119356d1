//! The namespace cases (groups 7 and 10 of `main.rs`): walking a dataset tree, and the binned MRC
//! views of the tomogram's OME-Zarr pyramid.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::cases::read_whole;
use crate::fixture::{DATASET, PYRAMID};
use crate::mount;
use crate::report::{Row, Unit};
use crate::Bench;

/// Counts files under `dir`, stat-ing each (what `find -type f` plus `stat` does).
fn count_files(dir: &Path) -> usize {
    fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|entry| {
            let meta = fs::metadata(entry.path()).unwrap();
            if meta.is_dir() {
                count_files(&entry.path())
            } else {
                1
            }
        })
        .sum()
}

/// 7: find + stat over the dataset tree, cold and after a remount; raw: serial LISTs.
pub fn walk(b: &Bench) -> Vec<Row> {
    let expected = b.fixture.runs_dataset * 5;
    let (mut cold, mut again, mut raw) = (vec![], vec![], vec![]);
    for _ in 0..b.opts.runs {
        let cache = mount::cache_dir();
        for runs in [&mut cold, &mut again] {
            let mount = b.mount(cache.path(), &[]);
            runs.push(b.on(&mount, 0, || assert_eq!(count_files(&mount.file(DATASET)), expected)).0);
        }
        let listed = b.raw_with(0, || assert_eq!(b.raw.list_serially(&format!("{DATASET}/")), expected)).0;
        raw.push(listed.noted("one LIST per folder, serially"));
    }
    vec![
        Row::compare("find + stat, dataset tree, cold", Unit::Seconds, &cold, &raw, "<= 0.1x (10x faster)"),
        Row::compare("same walk after remount", Unit::Seconds, &again, &[], "<= 1 s"),
    ]
}

/// 10: the binned views: a cold listing with and without them, one XY section of the bin-4 view
/// (time to first image), the whole bin-4 and bin-2 views against raw GETs of the chunks they come
/// from, and the full-resolution MRC for scale.
pub fn views(b: &Bench) -> Vec<Row> {
    let view = |bin: u32| format!("{PYRAMID}.bin{bin}.mrc");
    let full = format!("{PYRAMID}.mrc");
    let folder = Path::new(&full).parent().unwrap().to_str().unwrap().to_owned();
    let levels = &b.fixture.levels;
    let (mut listing, mut plain, mut section, mut full_runs) = (vec![], vec![], vec![], vec![]);
    let mut whole = [(4, &levels[1], vec![], vec![]), (2, &levels[0], vec![], vec![])];
    let list = |dir: &Path| fs::read_dir(dir).unwrap().for_each(drop);
    for _ in 0..b.opts.runs {
        plain.push(b.fresh(&["--no-mrc-views"], &[], 0, |m| list(&m.file(&folder))).0.noted("--no-mrc-views"));
        let cache = mount::cache_dir();
        let mount = b.mount(cache.path(), &[]);
        listing.push(b.on(&mount, 0, || list(&mount.file(&folder))).0);
        fs::metadata(mount.file(&view(4))).unwrap();
        let [nz, ny, nx] = levels[1].shape;
        let bytes = ny * nx * 4;
        section.push(
            b.on(&mount, 1024 + bytes, || {
                let file = File::open(mount.file(&view(4))).unwrap();
                file.read_exact_at(&mut [0u8; 1024], 0).unwrap();
                file.read_exact_at(&mut vec![0u8; bytes as usize], 1024 + nz / 2 * bytes).unwrap();
            })
            .0,
        );
        drop((mount, cache));
        for (bin, level, runs, raw) in &mut whole {
            let size = 1024 + level.shape.iter().product::<u64>() * 4;
            let key = view(*bin);
            runs.push(b.fresh(&[], &[&key], size, |m| assert_eq!(read_whole(&m.file(&key)), size)).0);
            let chunks: Vec<&str> = level.chunk_keys.iter().map(String::as_str).collect();
            raw.push(b.raw_objects(&chunks, 2 << 20, 32).noted("its chunks, compressed"));
        }
        let size = b.fixture.mrc.size();
        full_runs.push(b.fresh(&[], &[&full], size, |m| assert_eq!(read_whole(&m.file(&full)), size)).0);
    }
    let mut rows = vec![
        Row::compare("views: cold listing of the tomogram's folder", Unit::Seconds, &listing, &plain, "-"),
        Row::compare("views: bin-4 header + middle XY section, cold", Unit::Seconds, &section, &[], "< 1 s"),
    ];
    for (bin, _, runs, raw) in &whole {
        rows.push(Row::compare(
            format!("views: bin-{bin} view, whole file, cold"),
            Unit::Seconds,
            runs,
            raw,
            "<= 1.5x",
        ));
    }
    rows.push(Row::compare("views: full-resolution MRC, whole file, cold", Unit::Seconds, &full_runs, &[], "-"));
    rows
}
