// Copies the canonical client (clients/js) to the files the hub serves
// (src/revenge_ws/static). `--check` only verifies that they are identical (exit 1 if not).
import { readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(dirname(fileURLToPath(import.meta.url)));
const target = join(here, "..", "..", "src", "revenge_ws", "static");
const check = process.argv.includes("--check");
let stale = 0;
for (const name of ["revenge-ws.js", "revenge-ws.d.ts"]) {
  const src = readFileSync(join(here, name));
  const dst = join(target, name);
  let same = false;
  try {
    same = Buffer.compare(src, readFileSync(dst)) === 0;
  } catch {
    same = false;
  }
  if (same) continue;
  if (check) {
    console.error(`${dst} differs from clients/js/${name}: run npm run sync in clients/js`);
    stale += 1;
  } else {
    writeFileSync(dst, src);
    console.log(`copied ${name} -> ${dst}`);
  }
}
process.exit(stale ? 1 : 0);
