// Streams a generation through the gateway with stubs built from protos/ at run time,
// as a Node.js backend would, and prints one JSON line per chunk, then the status.
// Usage: node generate.mjs HOST:PORT MODEL PROMPT MAX_TOKENS [API_KEY_ENV]
// With API_KEY_ENV, the key is read from that environment variable (never argv, which
// other users of the machine can read) and sent as `authorization: Bearer <key>`.
import { fileURLToPath } from "node:url";
import path from "node:path";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const [address, model, prompt, maxTokens, keyEnv] = process.argv.slice(2);
const protos = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../protos");
const definition = protoLoader.loadSync("tensorgate/gateway/v1/gateway.proto", {
  includeDirs: [protos],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
});
const { tensorgate } = grpc.loadPackageDefinition(definition);
const client = new tensorgate.gateway.v1.InferenceGateway(address, grpc.credentials.createInsecure());

const metadata = new grpc.Metadata();
if (keyEnv) metadata.set("authorization", `Bearer ${process.env[keyEnv]}`);
const call = client.Generate({ model, prompt, max_tokens: Number(maxTokens), seed: "5" }, metadata);
call.on("data", (chunk) => console.log(JSON.stringify({ chunk })));
// The status event comes once, last, for success and failure alike; errors are
// reported through it, so the error event needs no handling of its own.
call.on("error", () => {});
call.on("status", (status) => {
  const line = { status: grpc.status[status.code] };
  if (status.code !== grpc.status.OK) line.details = status.details;
  console.log(JSON.stringify(line));
  client.close();
});
