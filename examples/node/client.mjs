// Starts a run of a registered pipeline, follows it to its end, downloads an output.
//
//   npm install && PLAIT_TOKEN=... node client.mjs HOST:PORT pipelines/NAME/versions/VERSION [STEP [OUTPUT]]
//
// Every call carries the token in PLAIT_TOKEN as "authorization: Bearer <token>": the control
// plane refuses calls without one.
// Prints one JSON line: the run's status, its steps, and the chosen output's bytes as text.
import { fileURLToPath } from "node:url";
import path from "node:path";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const [address, version, stepId, outputName = "output"] = process.argv.slice(2);
if (!address || !version) {
  console.error("usage: node client.mjs HOST:PORT pipelines/NAME/versions/VERSION [STEP [OUTPUT]]");
  process.exit(2);
}

// the .proto files are the contract: load them as they are
const protoDir = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../proto");
const definition = protoLoader.loadSync(
  ["plait/api/v1/run_service.proto", "plait/api/v1/artifact_service.proto"],
  { includeDirs: [protoDir], keepCase: true, longs: String, enums: String, defaults: true },
);
const api = grpc.loadPackageDefinition(definition).plait.api.v1;
const credentials = grpc.credentials.createInsecure();
const runs = new api.RunService(address, credentials);
const artifacts = new api.ArtifactService(address, credentials);
const metadata = new grpc.Metadata();
if (process.env.PLAIT_TOKEN) metadata.add("authorization", `Bearer ${process.env.PLAIT_TOKEN}`);

const call = (client, method, request) =>
  new Promise((resolve, reject) =>
    client[method](request, metadata, (err, response) => (err ? reject(err) : resolve(response))));

const { run } = await call(runs, "CreateRun", {
  pipeline_version: version,
  request_id: `node-${process.pid}-${Date.now()}`,
});

// follow the run: the stream ends with the event that ends the run
const transitions = [];
await new Promise((resolve, reject) => {
  const stream = runs.WatchRunEvents({ name: run.name }, metadata);
  stream.on("data", ({ events }) => {
    for (const e of events) transitions.push(e.step_id ? `${e.step_id}:${e.step_status}` : e.run_status);
  });
  stream.on("end", resolve);
  stream.on("error", reject);
});

const { run: finished } = await call(runs, "GetRun", { name: run.name });
const step = finished.steps.find((s) => s.step_id === (stepId ?? finished.steps.at(-1).step_id));
const artifact = step.outputs.find((o) => o.output === outputName);

// download the output's bytes in chunks
const chunks = [];
await new Promise((resolve, reject) => {
  const stream = artifacts.DownloadArtifact({ name: artifact.name }, metadata);
  stream.on("data", (msg) => chunks.push(msg.data));
  stream.on("end", resolve);
  stream.on("error", reject);
});

console.log(JSON.stringify({
  run_id: finished.run_id,
  status: finished.status,
  steps: Object.fromEntries(finished.steps.map((s) => [s.step_id, s.status])),
  transitions,
  output: Buffer.concat(chunks).toString("utf8"),
  digest: artifact.digest,
}));
runs.close();
artifacts.close();
