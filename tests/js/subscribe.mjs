// Runs fal.subscribe on text-to-image against our server with fal's own JS client, unmodified.
// usage: node subscribe.mjs <base-url> <key> <poll|stream|proxy>
// Prints one JSON line: the result, the request id, the statuses seen and the final log messages.
import { fal } from "@fal-ai/client";

const [base, key, mode] = process.argv.slice(2);

if (mode === "proxy") {
  // What browser apps do: every call goes to one URL, the real target travels in a header.
  fal.config({ credentials: key, proxyUrl: { url: `${base}/api/fal/proxy`, when: "always" } });
} else {
  const rewrite = (url) =>
    url.replace("https://queue.fal.run/", `${base}/queue/`).replace("https://fal.run/", `${base}/`);
  fal.config({ credentials: key, requestMiddleware: async (req) => ({ ...req, url: rewrite(req.url) }) });
}

const statuses = [];
let logs = [];
const result = await fal.subscribe("fal-ai/flux/srpo", {
  input: { prompt: "a lighthouse", image_size: { width: 256, height: 256 }, num_inference_steps: 6, seed: 5 },
  logs: true,
  mode: mode === "stream" ? "streaming" : "polling",
  pollInterval: 100,
  onQueueUpdate: (update) => {
    statuses.push(update.status);
    if (update.logs) logs = update.logs.map((entry) => entry.message);
  },
});
console.log(JSON.stringify({ requestId: result.requestId, data: result.data, statuses, logs }));
