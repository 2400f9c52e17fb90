//! Tests for the image format: it round-trips, and every way an image can
//! be damaged is refused with an error that says what is wrong.

use super::*;
use std::os::unix::fs::PermissionsExt;

/// A manifest of no process over what `w` holds (also used by other
/// modules' tests).
pub(crate) fn manifest(w: &mut ImageWriter) -> Manifest {
    Manifest {
        tool_version: "test".into(),
        created_unix_ms: 1,
        kernel: "test".into(),
        xstate_size: 0,
        pages: w.pages_info().unwrap(),
        processes: vec![],
        objects: vec![],
        pipes: vec![],
        parent: None,
    }
}

/// An image with `mib` MiB (plus a page) of patterned pages.
fn make(dir: &Path, mib: usize) -> PathBuf {
    let mut w = ImageWriter::create(dir).unwrap();
    let data: Vec<u8> = (0..(mib << 20) + 4096)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    w.append(&data).unwrap();
    let m = manifest(&mut w);
    w.finish(&m).unwrap()
}

fn err(dir: &Path) -> String {
    match Image::open_verified(dir) {
        Ok(_) => panic!("{} was accepted", dir.display()),
        Err(e) => {
            assert!(matches!(e, Error::BadImage { .. }), "{e:?}");
            e.to_string()
        }
    }
}

fn patch(path: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut b = fs::read(path).unwrap();
    f(&mut b);
    fs::write(path, b).unwrap();
}

#[test]
fn round_trip_is_private_and_atomic() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = make(&tmp.path().join("img"), 3);
    let img = Image::open_verified(&dir).unwrap();
    assert_eq!(img.manifest.pages.len, (3 << 20) + 4096);
    assert_eq!(img.manifest.pages.chunk_checksums.len(), 4);
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join(MANIFEST_FILE)), 0o600);
    assert_eq!(mode(&dir.join(PAGES_FILE)), 0o600);
    assert!(!partial_path(&dir).exists());
}

#[test]
fn an_unfinished_image_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("img");
    let mut w = ImageWriter::create(&dir).unwrap();
    w.append(&[1u8; 8192]).unwrap();
    assert!(partial_path(&dir).exists());
    drop(w);
    assert!(!dir.exists() && !partial_path(&dir).exists());
}

#[test]
fn an_existing_directory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = make(&tmp.path().join("img"), 0);
    assert!(matches!(
        ImageWriter::create(&dir),
        Err(Error::Exists { .. })
    ));
}

#[test]
fn out_of_order_pages_get_checksums_from_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("img");
    let mut w = ImageWriter::create(&dir).unwrap();
    w.append(&[3u8; 4096]).unwrap();
    let at = w.reserve(2 << 20);
    w.write_at(at + 4096, &[9u8; 4096]).unwrap();
    let m = manifest(&mut w);
    w.finish(&m).unwrap();
    Image::open_verified(&dir).unwrap();
}

#[test]
fn damage_is_refused_with_a_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let good = make(&tmp.path().join("good"), 2);
    let copy = |name: &str| {
        let d = tmp.path().join(name);
        fs::create_dir(&d).unwrap();
        for f in [MANIFEST_FILE, PAGES_FILE] {
            fs::copy(good.join(f), d.join(f)).unwrap();
        }
        d
    };
    let d = copy("magic");
    patch(&d.join(MANIFEST_FILE), |b| b[0] ^= 1);
    assert!(err(&d).contains("bad magic"));
    let d = copy("version");
    patch(&d.join(MANIFEST_FILE), |b| b[8] = 2);
    assert!(err(&d).contains("format version 2 is not supported"));
    let d = copy("body");
    patch(&d.join(MANIFEST_FILE), |b| {
        let n = b.len() - 3;
        b[n] ^= 1
    });
    assert!(err(&d).contains("checksum mismatch"));
    let d = copy("short-manifest");
    patch(&d.join(MANIFEST_FILE), |b| b.truncate(b.len() - 10));
    assert!(err(&d).contains("truncated"));
    let d = copy("short-pages");
    patch(&d.join(PAGES_FILE), |b| b.truncate(4096));
    assert!(err(&d).contains("truncated"));
    let d = copy("flipped-page");
    patch(&d.join(PAGES_FILE), |b| b[(1 << 20) + 5] ^= 0x80);
    assert!(err(&d).contains("chunk 1"));
    let d = copy("no-pages");
    fs::remove_file(d.join(PAGES_FILE)).unwrap();
    assert!(err(&d).contains(PAGES_FILE));
    let d = copy("no-manifest");
    fs::remove_file(d.join(MANIFEST_FILE)).unwrap();
    assert!(err(&d).contains("cannot read manifest"));
    assert!(err(&tmp.path().join("absent")).contains("not a directory"));
}

#[test]
fn a_changed_parent_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let parent = make(&tmp.path().join("parent"), 0);
    let sum = Image::open(&parent).unwrap().manifest_sum;
    let child = tmp.path().join("child");
    let mut w = ImageWriter::create(&child).unwrap();
    let mut m = manifest(&mut w);
    m.parent = Some(ParentRef {
        dir: parent.clone(),
        manifest_sum: sum,
    });
    w.finish(&m).unwrap();
    assert_eq!(Image::open(&child).unwrap().ancestors().unwrap().len(), 1);
    let mut m2 = Image::open(&parent).unwrap().manifest;
    m2.kernel = "other".into();
    fs::remove_dir_all(&parent).unwrap();
    let mut w = ImageWriter::create(&parent).unwrap();
    w.append(&[0u8; 4096]).unwrap();
    m2.pages = w.pages_info().unwrap();
    w.finish(&m2).unwrap();
    let e = Image::open(&child)
        .unwrap()
        .ancestors()
        .err()
        .expect("refused");
    assert!(
        e.to_string().contains("changed since the child was taken"),
        "{e}"
    );
}
