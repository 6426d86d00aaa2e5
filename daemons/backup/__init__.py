"""`onebox backup` and `onebox restore`: a box's state in one tar, taken while it runs.

The archive (plain tar, or gzip/bzip2/xz by its suffix) holds:
- state/index.db, state/ledger.db, state/keys.db: each copied with SQLite's online backup
  API in one step, inside one read transaction. In WAL mode that read sees one commit and
  never blocks the writer (nor is restarted by it, as a page-by-page backup would be), so
  the copy is consistent however busy the suite is. Each copy passes quick_check before
  it goes in.
- state/keys.secret: the HMAC key API keys are hashed with (the keys are useless without it).
- config/onebox.toml: the config file. Provider credentials (/etc/onebox/credentials/) are
  never included: they go back by hand, from wherever such secrets are kept.
- markdown/...: the markdown cache, so nothing is parsed or OCR'd again.
- inbox/COLLECTION/...: every collection folder's files (leave them out with --no-inbox).
  They are in by default because the ingestion daemon rescans its inboxes at start and
  drops from the index every file it no longer finds: an index restored without its
  files would empty itself. Each file's exact mtime (ns) is kept too, since a file whose
  size or mtime differs from what the index recorded is indexed again.
- manifest.json, last (it needs every member's sha256): format, onebox version, each
  database's applied migrations and row counts, created_at, hostname, the state
  directory and collection folders it came from, and sha256/size/mtime/mode of each
  member.

Order makes the parts agree: the databases are copied first, then the markdown cache
(an entry is written before its document is committed and never removed), then the
inboxes (a file added, changed or removed after the index copy is simply found changed
at the restored box's first rescan and indexed or dropped then, as on the live box).

Restore reads the manifest first (refusing a newer format, unknown databases or
migrations this version does not know), stages every member beside its destination
under a dot-name while checking its sha256, and only when all of them match renames them
into place: a damaged archive changes nothing.
"""

from daemons.backup.errors import BackupError, IncompatibleBackup

__all__ = ["BackupError", "IncompatibleBackup"]
