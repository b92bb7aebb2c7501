//! `files` endpoints: JSON-lines files (one record per line, Azure's encoding) under `path`,
//! named by `fileNameFormat`.
//!
//! Each partition writes one file at a time to `path/.ingot-tmp/ENDPOINT-pNNNN` (truncated when
//! a file is opened, so a crash leaves nothing behind but that file, overwritten later). A file
//! is rolled when it reaches `maxChunkSizeInBytes` (it may pass it by the last record), when it
//! is `batchFrequencyInSeconds` old, or at shutdown: it is fsynced, linked under its final name
//! (never over an existing file: a second file with the same name, for two rolls in one minute,
//! gets `-1`, `-2`, ... before its extension), the directories are fsynced, and only then the
//! partition's checkpoint moves past its records. Empty files are never written.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Datelike, Timelike, Utc};
use tokio::io::AsyncWriteExt;

use super::partition::{Base, Tail, ERROR_WAIT};
use crate::config::{
    EndpointConfig, BATCH_FREQUENCY_SECS_DEFAULT, FILE_NAME_FORMAT_DEFAULT, MAX_CHUNK_BYTES_DEFAULT,
};
use ingot_engine::store::Offset;

/// Records read per look (the read-ahead bound, with the byte bound below).
const READ_RECORDS: usize = 1000;
const READ_BYTES: usize = 1 << 20;
/// Where files are written before they are rolled, below `path`.
pub const TMP_DIR: &str = ".ingot-tmp";

/// A `files` endpoint's settings, defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilesSettings {
    pub path: PathBuf,
    pub file_name_format: String,
    pub batch_frequency: Duration,
    pub max_chunk_bytes: u64,
}

impl FilesSettings {
    pub fn from_config(endpoint: &EndpointConfig) -> anyhow::Result<FilesSettings> {
        let path = endpoint
            .path
            .clone()
            .ok_or_else(|| anyhow::anyhow!("endpoint '{}' has no path", endpoint.name))?;
        Ok(FilesSettings {
            path,
            file_name_format: endpoint
                .file_name_format
                .clone()
                .unwrap_or_else(|| FILE_NAME_FORMAT_DEFAULT.to_owned()),
            batch_frequency: Duration::from_secs(u64::from(
                endpoint
                    .batch_frequency_in_seconds
                    .unwrap_or(BATCH_FREQUENCY_SECS_DEFAULT),
            )),
            max_chunk_bytes: endpoint
                .max_chunk_size_in_bytes
                .unwrap_or(MAX_CHUNK_BYTES_DEFAULT),
        })
    }
}

/// The file name `format` gives for `hub`, `partition` and the file's open time (UTC).
pub fn render_file_name(format: &str, hub: &str, partition: u32, time: DateTime<Utc>) -> String {
    format
        .replace("{iothub}", hub)
        .replace("{partition}", &partition.to_string())
        .replace("{YYYY}", &format!("{:04}", time.year()))
        .replace("{MM}", &format!("{:02}", time.month()))
        .replace("{DD}", &format!("{:02}", time.day()))
        .replace("{HH}", &format!("{:02}", time.hour()))
        .replace("{mm}", &format!("{:02}", time.minute()))
}

/// `name` with `-n` before the extension of its last part (`05` -> `05-1`, `05.json` ->
/// `05-1.json`); `n = 0` is `name` itself.
pub fn numbered(name: &str, n: u32) -> String {
    if n == 0 {
        return name.to_owned();
    }
    let (dir, file) = match name.rsplit_once('/') {
        Some((dir, file)) => (Some(dir), file),
        None => (None, name),
    };
    let file = match file.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => format!("{stem}-{n}.{ext}"),
        _ => format!("{file}-{n}"),
    };
    match dir {
        Some(dir) => format!("{dir}/{file}"),
        None => file,
    }
}

struct OpenFile {
    file: tokio::fs::File,
    name: String,
    bytes: u64,
    records: u64,
    opened: Instant,
    /// The offset after the last record written.
    next: Offset,
}

pub(crate) async fn run(base: Base, settings: FilesSettings, hub: String) {
    let Some(mut tail) = Tail::open(base).await else {
        return;
    };
    let tmp_dir = settings.path.join(TMP_DIR);
    let tmp = tmp_dir.join(format!("{}-p{:04}", tail.base.endpoint, tail.base.id.0));
    let mut open: Option<OpenFile> = None;
    loop {
        let stopping = tail.stopping();
        let room = match &open {
            Some(f) => settings.max_chunk_bytes.saturating_sub(f.bytes),
            None => settings.max_chunk_bytes,
        };
        let items = if stopping {
            Vec::new()
        } else {
            tail.read(READ_RECORDS, (room as usize).clamp(1, READ_BYTES))
        };
        let mut failed = None;
        if let Some(last) = items.last() {
            tail.busy();
            if open.is_none() {
                let now = Utc::now();
                match open_tmp(&tmp_dir, &tmp).await {
                    Ok(file) => {
                        open = Some(OpenFile {
                            file,
                            name: render_file_name(
                                &settings.file_name_format,
                                &hub,
                                tail.base.id.0,
                                now,
                            ),
                            bytes: 0,
                            records: 0,
                            opened: Instant::now(),
                            next: last.offset,
                        })
                    }
                    Err(e) => failed = Some(e),
                }
            }
            if let Some(file) = &mut open {
                let mut buffer = Vec::with_capacity(items.iter().map(|i| i.json.len() + 1).sum());
                for item in &items {
                    buffer.extend_from_slice(&item.json);
                    buffer.push(b'\n');
                }
                match file.file.write_all(&buffer).await {
                    Ok(()) => {
                        file.bytes += buffer.len() as u64;
                        file.records += items.len() as u64;
                        file.next = Offset(last.offset.0 + 1);
                    }
                    Err(e) => failed = Some(e.into()),
                }
            }
        }
        let due = open.as_ref().is_some_and(|f| {
            stopping
                || f.bytes >= settings.max_chunk_bytes
                || f.opened.elapsed() >= settings.batch_frequency
        });
        if failed.is_none() && due {
            if let Some(file) = open.take() {
                let records = file.records;
                let next = file.next;
                match roll(file, &tmp, &settings.path).await {
                    Ok(name) => match tail.commit(next).await {
                        Ok(()) => {
                            tail.base.counters.delivered(records);
                            tracing::debug!(endpoint = %tail.base.endpoint, file = %name.display(), records, "file rolled");
                        }
                        Err(e) => failed = Some(e),
                    },
                    Err(e) => failed = Some(e),
                }
            }
        }
        if let Some(e) = failed {
            tracing::warn!(endpoint = %tail.base.endpoint, partition = tail.base.id.0,
                "writing files failed, retrying from the last checkpoint: {e:#}");
            open = None;
            tail.rewind();
            if super::partition::stop_or_sleep(&mut tail.base.stop, ERROR_WAIT).await {
                return;
            }
            continue;
        }
        if stopping {
            return;
        }
        if items.is_empty() {
            let limit = match &open {
                Some(f) => settings
                    .batch_frequency
                    .saturating_sub(f.opened.elapsed())
                    .max(Duration::from_millis(1)),
                None => Duration::MAX,
            };
            // A stop signal during the wait is seen at the top of the loop, which rolls.
            tail.idle(limit).await;
        }
    }
}

async fn open_tmp(tmp_dir: &Path, tmp: &Path) -> anyhow::Result<tokio::fs::File> {
    tokio::fs::create_dir_all(tmp_dir).await?;
    Ok(tokio::fs::File::create(tmp).await?)
}

/// Makes the file durable under its final name; returns that name.
async fn roll(mut file: OpenFile, tmp: &Path, root: &Path) -> anyhow::Result<PathBuf> {
    file.file.flush().await?;
    file.file.sync_all().await?;
    drop(file.file);
    let tmp = tmp.to_path_buf();
    let root = root.to_path_buf();
    let name = file.name;
    let path = tokio::task::spawn_blocking(move || link_unique(&tmp, &root, &name)).await??;
    Ok(path)
}

fn link_unique(tmp: &Path, root: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let first = root.join(name);
    if let Some(parent) = first.parent() {
        std::fs::create_dir_all(parent)?;
    }
    for n in 0..10_000 {
        let path = root.join(numbered(name, n));
        match std::fs::hard_link(tmp, &path) {
            Ok(()) => {
                std::fs::remove_file(tmp)?;
                // The new entry, and every directory created for it, down from `root`.
                let mut dir = path.parent();
                while let Some(d) = dir {
                    std::fs::File::open(d)?.sync_all()?;
                    if d == root {
                        break;
                    }
                    dir = d.parent();
                }
                return Ok(path);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e.into()),
        }
    }
    anyhow::bail!("no free name for {name}")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn names_follow_azures_tokens() {
        let time = Utc.with_ymd_and_hms(2026, 3, 7, 9, 5, 59).unwrap();
        assert_eq!(
            render_file_name(FILE_NAME_FORMAT_DEFAULT, "myhub", 3, time),
            "myhub/3/2026/03/07/09/05"
        );
        assert_eq!(
            render_file_name(
                "{YYYY}{MM}{DD}-{HH}{mm}_{partition}_{iothub}.json",
                "h",
                0,
                time
            ),
            "20260307-0905_0_h.json"
        );
    }

    #[test]
    fn a_second_file_with_the_same_name_gets_a_suffix() {
        assert_eq!(numbered("h/0/05", 0), "h/0/05");
        assert_eq!(numbered("h/0/05", 2), "h/0/05-2");
        assert_eq!(numbered("h/0.x/05.json", 1), "h/0.x/05-1.json");
        assert_eq!(numbered(".hidden", 1), ".hidden-1");
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("tmp");
        let mut paths = Vec::new();
        for content in ["a", "b", "c"] {
            std::fs::write(&tmp, content).unwrap();
            paths.push(link_unique(&tmp, dir.path(), "h/0/05").unwrap());
            assert!(!tmp.exists());
        }
        assert_eq!(paths[0], dir.path().join("h/0/05"));
        assert_eq!(paths[1], dir.path().join("h/0/05-1"));
        assert_eq!(paths[2], dir.path().join("h/0/05-2"));
        let contents: Vec<String> = paths
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect();
        assert_eq!(contents, ["a", "b", "c"]);
    }
}
