/**
 * An app-like database for the benchmark, generated server-side (no row-by-row inserts): messages
 * of random common words, 1536-float embeddings, and incompressible attachments, in about the
 * proportions 50% / 35% / 15% of the requested size.
 */
import type { TestServer } from '../test/helpers/pg-server.ts';

const WORDS = (
  'the of and to in is you that it he was for on are as with his they at be this have from or one had by word but not what all ' +
  'were we when your can said there use an each which she do how their if will up other about out many then them these so some her ' +
  'would make like him into time has look two more write go see number no way could people my than first water been call who oil ' +
  'its now find long down day did get come made may part over new sound take only little work know place year live me back give ' +
  'most very after thing our just name good sentence man think say great where help through much before line right too mean old any ' +
  'same tell boy follow came want show also around form three small set put end does another well large must big even such because ' +
  'turn here why ask went men read need land different home us move try kind hand picture again change off play spell air away ' +
  'animal house point page letter mother answer found study still learn should world database backup restore query index table ' +
  'schema vector embedding model token prompt context window user assistant system reply question answer summary project knowledge'
).split(' ');

/** Generate an app-like database of about `sizeMb`, server-side, with two connections at once; returns its size. */
export async function generateAppDatabase(server: TestServer, database: string, sizeMb: number): Promise<number> {
  await server.createDatabase(database);
  const setup = await server.connect(database);
  await setup.query(`
    CREATE TABLE conversations (id int PRIMARY KEY, title text, project text, meta jsonb, created_at timestamptz DEFAULT now());
    CREATE TABLE messages (id bigserial PRIMARY KEY, conversation_id int NOT NULL REFERENCES conversations(id), role text, content text, created_at timestamptz DEFAULT now());
    CREATE TABLE conversation_index (conversation_id int PRIMARY KEY REFERENCES conversations(id), embedding real[] NOT NULL, indexed_at timestamptz DEFAULT now());
    CREATE TABLE project_knowledge (id serial PRIMARY KEY, project text, key text, summary text, payload bytea);`);
  const bytes = sizeMb * 1024 * 1024;
  const messages = Math.round((bytes * 0.5) / 420);
  const conversations = Math.max(1000, Math.round(messages / 50));
  const embeddings = Math.min(conversations, Math.round((bytes * 0.35) / 6300));
  const blobs = Math.round((bytes * 0.15) / 65_600);
  await setup.query(
    `INSERT INTO conversations SELECT i, 'Conversation ' || i, 'project-' || (i % 20), jsonb_build_object('i', i, 'tags', jsonb_build_array('a', 'b')) FROM generate_series(1, $1) i`,
    [conversations],
  );
  const words = `ARRAY[${WORDS.map((w) => `'${w}'`).join(',')}]`;
  const chunks: string[] = [];
  const chunked = (total: number, size: number, sql: (from: number, to: number) => string) => {
    for (let from = 1; from <= total; from += size) chunks.push(sql(from, Math.min(total, from + size - 1)));
  };
  chunked(
    messages,
    100_000,
    (a, b) => `INSERT INTO messages (conversation_id, role, content)
    SELECT 1 + i % ${conversations}, (ARRAY['user','assistant'])[1 + i % 2],
           (SELECT string_agg((${words})[1 + (random() * ${WORDS.length - 1})::int], ' ') FROM generate_series(1, 20 + (i % 80)))
      FROM generate_series(${a}, ${b}) i`,
  );
  chunked(
    embeddings,
    10_000,
    (a, b) => `INSERT INTO conversation_index (conversation_id, embedding)
    SELECT i, ARRAY(SELECT (random() * 2 - 1)::real FROM generate_series(1, 1536)) FROM generate_series(${a}, ${b}) i`,
  );
  chunked(
    blobs,
    500,
    (a, b) => `INSERT INTO project_knowledge (project, key, summary, payload)
    SELECT 'project-' || (i % 20), 'doc-' || i, 'attachment ' || i,
           (SELECT string_agg(decode(md5(i || '-' || j), 'hex'), ''::bytea) FROM generate_series(1, 4096) j)
      FROM generate_series(${a}, ${b}) i`,
  );
  const workers = await Promise.all([server.connect(database), server.connect(database)]);
  await Promise.all(
    workers.map(async (client) => {
      for (let sql = chunks.shift(); sql; sql = chunks.shift()) await client.query(sql);
    }),
  );
  await Promise.all(workers.map((c) => c.end()));
  await setup.query('VACUUM ANALYZE');
  const size = Number(
    (await setup.query<{ n: string }>('SELECT pg_database_size(current_database())::text AS n')).rows[0]!.n,
  );
  await setup.end();
  return size;
}
