// Builds one JavaScript strategy into a component:
//   node guest-sdk/js/build.mjs NODE_MODULES SRC_DIR OUT.wasm
// SRC_DIR holds app.js (which may `import ... from 'tessera-sdk'`) and
// manifest.toml (its `world` picks the WIT world); NODE_MODULES is where
// `npm ci` installed this package's pinned build tools (kept out of the
// checkout, under $TESSERA_HOME). esbuild bundles app.js with the SDK into
// one module (the host interfaces stay imports), componentize-js turns it
// into a component. Rebuilt only when SRC_DIR, the SDK or the WIT is newer
// than OUT.wasm; written to a temporary file first.
import { createRequire } from 'node:module';
import { readFile, writeFile, rename, stat, readdir, mkdtemp } from 'node:fs/promises';
import { join, dirname, resolve } from 'node:path';
import { tmpdir } from 'node:os';
import { fileURLToPath, pathToFileURL } from 'node:url';

const [nodeModules, srcDir, out] = process.argv.slice(2);
if (!nodeModules || !srcDir || !out) {
  console.error('usage: node build.mjs NODE_MODULES SRC_DIR OUT.wasm');
  process.exit(2);
}
const sdk = dirname(fileURLToPath(import.meta.url));
const root = resolve(sdk, '../..');
const manifest = await readFile(join(srcDir, 'manifest.toml'), 'utf8');
const world = /^world\s*=\s*"([^"]+)"/m.exec(manifest)?.[1];
if (!world) {
  console.error(`${srcDir}/manifest.toml names no world`);
  process.exit(1);
}

async function newest(path) {
  const s = await stat(path);
  if (!s.isDirectory()) return s.mtimeMs;
  let t = s.mtimeMs;
  for (const e of await readdir(path)) t = Math.max(t, await newest(join(path, e)));
  return t;
}
try {
  const built = (await stat(out)).mtimeMs;
  const inputs = Math.max(await newest(srcDir), await newest(join(sdk, 'src')), await newest(join(root, 'wit')));
  if (inputs <= built) process.exit(0);
} catch {
  // not built yet
}

const require = createRequire(join(resolve(nodeModules), 'noop.js'));
const esbuild = await import(pathToFileURL(require.resolve('esbuild')));
// componentize-js exports an ES module only: its entry read from its package.json.
const cjsDir = join(resolve(nodeModules), '@bytecodealliance/componentize-js');
const cjsEntry = JSON.parse(await readFile(join(cjsDir, 'package.json'), 'utf8')).exports.import;
const { componentize } = await import(pathToFileURL(join(cjsDir, cjsEntry)));
const dir = await mkdtemp(join(tmpdir(), 'tessera-js-'));
const bundle = join(dir, 'bundle.js');
await esbuild.build({
  entryPoints: [join(srcDir, 'app.js')],
  bundle: true,
  format: 'esm',
  platform: 'neutral',
  outfile: bundle,
  external: ['tessera:*'],
  alias: { 'tessera-sdk': join(sdk, 'src/index.js') },
  logLevel: 'warning',
});
const { component } = await componentize({
  sourcePath: bundle,
  witPath: join(root, 'wit'),
  worldName: world,
  // A strategy reaches the world only through the host's interfaces.
  disableFeatures: ['random', 'stdio', 'clocks', 'http', 'fetch-event'],
});
await writeFile(`${out}.tmp`, component);
await rename(`${out}.tmp`, out);
console.log(`componentize-js: ${srcDir} -> ${out}`);
