-- The example database that `safehold run` backs up on a fresh machine (built-in config).
PRAGMA journal_mode = WAL;
PRAGMA user_version = 1;
CREATE TABLE notebooks (id INTEGER PRIMARY KEY, title TEXT NOT NULL UNIQUE,
                        created_at TEXT NOT NULL DEFAULT (datetime('now')));
CREATE TABLE notes (id INTEGER PRIMARY KEY, notebook_id INTEGER NOT NULL
                    REFERENCES notebooks(id) ON DELETE CASCADE,
                    body TEXT NOT NULL, pinned INTEGER NOT NULL DEFAULT 0,
                    created_at TEXT NOT NULL DEFAULT (datetime('now')));
CREATE INDEX notes_by_notebook ON notes(notebook_id, pinned);
INSERT INTO notebooks (title) VALUES ('Operations'), ('Ideas'), ('Journal');
INSERT INTO notes (notebook_id, body, pinned) VALUES
  (1, 'Rotate the backup bucket credentials every quarter', 1),
  (1, 'Test a restore every month — a backup never restored is a hope, not a backup', 1),
  (2, 'Cron + pg_dump | gzip is not a backup strategy', 0),
  (3, 'Installed Safehold; first backup taken', 0);
CREATE VIEW pinned_notes AS SELECT n.id, b.title, n.body FROM notes n
  JOIN notebooks b ON b.id = n.notebook_id WHERE n.pinned = 1;
