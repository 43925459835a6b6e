/**
 * The app's schema with data chosen to break naive backups: 1536-float embeddings (with NaN,
 * ±Infinity, -0 and denormals), a contrib `cube`, bytea holding all 256 byte values and a
 * >1 MB incompressible value, unicode and emoji, NULLs, jsonb, timestamptz (infinity too),
 * sequences, FKs, a partitioned table, a second schema, and awkward table names.
 */

export const AWKWARD_TABLES = {
  mixedCase: 'Mixed Case Table',
  injection: 'weird "quoted"; DROP TABLE messages; --',
  unicode: 'données_🎉',
} as const;

export const FIXTURE_SQL = `
CREATE EXTENSION cube;

CREATE TABLE conversations (
  id bigserial PRIMARY KEY,
  title text,
  project text NOT NULL,
  meta jsonb,
  created_at timestamptz NOT NULL
);
CREATE TABLE messages (
  id bigserial PRIMARY KEY,
  conversation_id bigint NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
  role text NOT NULL CHECK (role IN ('user', 'assistant', 'system')),
  content text,
  attachment bytea,
  created_at timestamptz
);
CREATE INDEX messages_conversation_idx ON messages (conversation_id, created_at);
CREATE TABLE project_knowledge (
  id serial PRIMARY KEY,
  project text NOT NULL,
  key text NOT NULL,
  summary text,
  payload bytea,
  UNIQUE (project, key)
);
CREATE TABLE conversation_index (
  conversation_id bigint PRIMARY KEY REFERENCES conversations(id),
  embedding real[] NOT NULL CHECK (array_length(embedding, 1) = 1536),
  centroid cube,
  indexed_at timestamptz
);
CREATE SEQUENCE ticket_numbers START 1000 INCREMENT 7;
SELECT setval('ticket_numbers', 4242);

INSERT INTO conversations (title, project, meta, created_at)
SELECT CASE WHEN i % 10 = 0 THEN NULL ELSE 'Conversation ' || i || ' – ünïcödé 🎉' END,
       'project-' || (i % 5),
       CASE WHEN i % 7 = 0 THEN NULL
            ELSE jsonb_build_object('i', i, 'tags', jsonb_build_array('a', 'ß', '日本'), 'nested', jsonb_build_object('x', i * 1.5)) END,
       timestamptz '2024-03-31 01:30:00+00' + i * interval '37 minutes'
  FROM generate_series(1, 150) AS i;
UPDATE conversations SET created_at = 'infinity' WHERE id = 150;

INSERT INTO messages (conversation_id, role, content, attachment, created_at)
SELECT 1 + (i % 150),
       (ARRAY['user', 'assistant', 'system'])[1 + i % 3],
       CASE WHEN i % 11 = 0 THEN NULL
            WHEN i % 11 = 1 THEN E'multi\\nline\\ttabbed "quoted" \\\\ backslash'
            WHEN i % 11 = 2 THEN '👩‍💻 emoji ZWJ, עברית RTL, e\u0301 combining, 中文'
            ELSE 'message ' || i || ' ' || md5(i::text) END,
       CASE WHEN i % 13 = 0 THEN decode(md5(i::text), 'hex') END,
       CASE WHEN i % 17 = 0 THEN NULL ELSE timestamptz '2024-10-27 00:00:00+02' + i * interval '1 second' END
  FROM generate_series(1, 3420) AS i;
-- Every byte value, and a >1 MB value that does not compress (stored out of line in TOAST).
INSERT INTO messages (conversation_id, role, content, attachment)
SELECT 1, 'system', 'all 256 byte values', decode(string_agg(lpad(to_hex(b), 2, '0'), '' ORDER BY b), 'hex')
  FROM generate_series(0, 255) AS b;
INSERT INTO messages (conversation_id, role, content, attachment)
SELECT 2, 'system', 'large binary', string_agg(decode(md5(i::text), 'hex'), ''::bytea ORDER BY i)
  FROM generate_series(1, 80000) AS i;

INSERT INTO project_knowledge (project, key, summary, payload)
SELECT 'project-' || (i % 5), 'key-' || i,
       CASE WHEN i % 4 = 0 THEN NULL ELSE repeat('knowledge ', i) END,
       CASE WHEN i % 3 = 0 THEN '\\x00ff00ff'::bytea END
  FROM generate_series(1, 12) AS i;

INSERT INTO conversation_index (conversation_id, embedding, centroid, indexed_at)
SELECT c, array_agg(CASE WHEN c = 1 AND d = 1 THEN 'NaN'::real
                         WHEN c = 1 AND d = 2 THEN 'Infinity'::real
                         WHEN c = 1 AND d = 3 THEN '-Infinity'::real
                         WHEN c = 1 AND d = 4 THEN '-0'::real
                         WHEN c = 1 AND d = 5 THEN 1.4e-45::real
                         ELSE (sin(c * 1536 + d) * 3.3)::real END ORDER BY d),
       cube(ARRAY[c, c / 3.0, -c]::float8[]),
       CASE WHEN c % 2 = 0 THEN now() END
  FROM generate_series(1, 145) AS c, generate_series(1, 1536) AS d
 GROUP BY c;

CREATE TABLE events (id int NOT NULL, at date NOT NULL, payload text) PARTITION BY RANGE (at);
CREATE TABLE events_2024 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
INSERT INTO events SELECT i, date '2024-06-01' + i, 'event ' || i FROM generate_series(1, 300) AS i;

CREATE SCHEMA archive;
CREATE TABLE archive.old_messages (id int PRIMARY KEY, body text, archived_at timestamptz DEFAULT now());
INSERT INTO archive.old_messages (id, body) SELECT i, 'archived ' || i FROM generate_series(1, 25) AS i;

CREATE TABLE "Mixed Case Table" ("Id" int PRIMARY KEY, "Value" text);
INSERT INTO "Mixed Case Table" VALUES (1, 'one'), (2, NULL), (3, 'three');
CREATE TABLE "weird ""quoted""; DROP TABLE messages; --" (x int);
INSERT INTO "weird ""quoted""; DROP TABLE messages; --" SELECT generate_series(1, 4);
CREATE TABLE "données_🎉" (v text);
INSERT INTO "données_🎉" VALUES ('é'), ('🎉');
CREATE TABLE empty_table (id int);
ANALYZE;
`;

/** Row counts the fixture creates, keyed as table_counts keys them. */
export const FIXTURE_COUNTS: Record<string, number> = {
  conversations: 150,
  messages: 3422,
  project_knowledge: 12,
  conversation_index: 145,
  events: 300,
  'archive.old_messages': 25,
  [AWKWARD_TABLES.mixedCase]: 3,
  [AWKWARD_TABLES.injection]: 4,
  [AWKWARD_TABLES.unicode]: 2,
  empty_table: 0,
};

/** Every table that holds rows itself (partitions, not their parent), as `schema.table`, sorted. */
export const FIXTURE_PHYSICAL_TABLES = [
  `archive.old_messages`,
  `public.${AWKWARD_TABLES.mixedCase}`,
  'public.conversation_index',
  'public.conversations',
  `public.${AWKWARD_TABLES.unicode}`,
  'public.empty_table',
  'public.events_2024',
  'public.events_2025',
  'public.messages',
  'public.project_knowledge',
  `public.${AWKWARD_TABLES.injection}`,
];
