// Builds dist/ (what server/web.py serves and the wheel ships) from src/ with esbuild:
// dist/app.js (src/main.js + uPlot, minified), dist/app.css, dist/index.html and
// dist/build.json (sha256 of every input and output, which tests/test_web_build.py reads).
// Deterministic: the same sources and lockfile give the same bytes.
import { createHash } from "node:crypto";
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const out = process.argv[2] || join(here, "dist");
mkdirSync(out, { recursive: true });

// uPlot is MIT licensed: its license text goes at the top of the bundle that ships it.
const license = readFileSync(join(here, "node_modules/uplot/LICENSE"), "utf8").trim();
const banner = `/*! layrot web view (Apache-2.0). Bundles uPlot ${JSON.parse(readFileSync(join(here, "node_modules/uplot/package.json"), "utf8")).version}:\n${license}\n*/`;
const common = { bundle: true, minify: true, legalComments: "none", logLevel: "warning", charset: "utf8", banner: { js: banner, css: banner } };
await esbuild.build({ ...common, entryPoints: [join(here, "src/main.js")], outfile: join(out, "app.js"), format: "iife", target: "es2020" });
await esbuild.build({ ...common, entryPoints: [join(here, "src/style.css")], outfile: join(out, "app.css") });
copyFileSync(join(here, "src/index.html"), join(out, "index.html"));

const sha = (p) => createHash("sha256").update(readFileSync(p)).digest("hex");
const inputs = ["build.mjs", "package.json", "package-lock.json", "src/index.html", "src/main.js", "src/style.css"];
const manifest = {
  esbuild: esbuild.version,
  inputs: Object.fromEntries(inputs.map((p) => [p, sha(join(here, p))])),
  outputs: Object.fromEntries(["app.js", "app.css", "index.html"].map((p) => [p, sha(join(out, p))])),
};
writeFileSync(join(out, "build.json"), JSON.stringify(manifest, null, 2) + "\n");
