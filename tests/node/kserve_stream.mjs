// Streams one tinylm generation through the gateway's KServe v2 ModelStreamInfer, as a
// Node.js caller of Triton's protocol would (@grpc/proto-loader, i.e. protobufjs), and
// prints one JSON line per response, then the status.
// Usage: node kserve_stream.mjs HOST:PORT DESCRIPTOR_SET MAX_TOKENS API_KEY_ENV
// DESCRIPTOR_SET: grpc_service.proto and model_config.proto as a FileDescriptorSet.
import fs from "node:fs";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const [address, descriptors, maxTokens, keyEnv] = process.argv.slice(2);
const definition = protoLoader.loadFileDescriptorSetFromBuffer(fs.readFileSync(descriptors), {
  keepCase: true,
  longs: String,
  defaults: false,
});
const { inference } = grpc.loadPackageDefinition(definition);
const client = new inference.GRPCInferenceService(address, grpc.credentials.createInsecure());

const int32 = (value) => {
  const buffer = Buffer.alloc(4);
  buffer.writeInt32LE(value);
  return buffer;
};
const float32 = (value) => {
  const buffer = Buffer.alloc(4);
  buffer.writeFloatLE(value);
  return buffer;
};
const prompt = Buffer.from("ROMEO:");
const inputs = [
  ["prompt", "BYTES", Buffer.concat([int32(prompt.length), prompt])],
  ["max_tokens", "INT32", int32(Number(maxTokens))],
  ["temperature", "FP32", float32(0)],
  ["top_p", "FP32", float32(1)],
  ["top_k", "INT32", int32(0)],
];

const metadata = new grpc.Metadata();
metadata.set("authorization", `Bearer ${process.env[keyEnv]}`);
const call = client.ModelStreamInfer(metadata);
call.on("data", (message) => {
  const response = message.infer_response ?? {};
  // Loaded from a descriptor set, a map field reads as its list of entries.
  const entries = response.parameters ?? [];
  const final = entries.find((entry) => entry.key === "triton_final_response");
  console.log(
    JSON.stringify({
      model_name: response.model_name,
      model_version: response.model_version,
      outputs: (response.outputs ?? []).map((output) => output.name),
      final: final ? final.value.bool_param : null,
    }),
  );
});
call.on("error", () => {});
call.on("status", (status) => {
  const line = { status: grpc.status[status.code] };
  if (status.code !== grpc.status.OK) line.details = status.details;
  console.log(JSON.stringify(line));
  client.close();
});
call.write({
  model_name: "tinylm",
  inputs: inputs.map(([name, datatype]) => ({ name, datatype, shape: [1] })),
  raw_input_contents: inputs.map(([, , contents]) => contents),
});
call.end();
