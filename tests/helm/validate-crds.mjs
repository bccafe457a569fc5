// Validate prometheus-operator objects with the CRD schemas of npm
// @kubernetes-models/prometheus-operator (installed by `make crd-schemas`).
//
//   node validate-crds.mjs NODE_MODULES_DIR < objects.json
//
// stdin: a JSON array of objects (ServiceMonitor, PodMonitor, PrometheusRule, ...).
// stdout: a JSON array, one entry per object: {"kind": ..., "name": ..., "error": null | "..."}.
// Exits 2 when the package is missing or an object's kind has no model.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const modules = process.argv[2];
if (!modules) {
  console.error("usage: node validate-crds.mjs NODE_MODULES_DIR < objects.json");
  process.exit(2);
}
const objects = JSON.parse(readFileSync(0, "utf8"));
const results = [];
for (const obj of objects) {
  const [group, version] = String(obj.apiVersion).split("/");
  const file = join(modules, "@kubernetes-models", "prometheus-operator", group, version, `${obj.kind}.js`);
  let Model;
  try {
    Model = (await import(pathToFileURL(file).href))[obj.kind];
  } catch (error) {
    console.error(`no model for ${obj.apiVersion} ${obj.kind} at ${file}: ${error.message}`);
    process.exit(2);
  }
  let message = null;
  try {
    new Model(obj).validate();
  } catch (error) {
    message = error.message;
  }
  results.push({ kind: obj.kind, name: obj.metadata?.name ?? null, error: message });
}
process.stdout.write(JSON.stringify(results));
