-- Site log v3: two pages less per commit. `AUTOINCREMENT` rewrote
-- `sqlite_sequence` at every insert: at a trickle (one event per commit)
-- that was one 1 KiB page of the four each commit appended to the WAL, and
-- a B-tree update per row in batches. The writer now gives each event its
-- seq itself (one more than the last it gave), and the highest seq ever
-- given is kept where a delete could otherwise lose it: `seq_floor` here,
-- raised before retention, eviction or a dead-letter purge deletes rows
-- (see `schema::events::seq_high`). Seqs still never go back, as readers'
-- cursors and the forwarding watermark need.
--
-- The table's declared SQL loses `AUTOINCREMENT` in place (the migration's
-- hook edits `sqlite_schema`): the rows' format does not change, so the log
-- is not copied, which on a full SD card would need its size again in free
-- space. `sqlite_sequence` keeps its last value, which `seq_high` still
-- reads.
INSERT INTO meta (key, value)
SELECT 'seq_floor', max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0),
                        coalesce((SELECT max(seq) FROM events), 0),
                        coalesce((SELECT max(seq) FROM dead_letter), 0));

-- The pending index listed every row of this site (the watermark leaves
-- their forwarded_at NULL), one more leaf page per commit, only so that
-- readers of pending rows could skip other sites' events. The watermark
-- now moves past other sites' rows that follow it (`forward::skip_forwarded`,
-- at every mark and every remote append), so the rows just above it are
-- this site's pending ones and those readers walk the table by seq.
DROP INDEX events_pending;
