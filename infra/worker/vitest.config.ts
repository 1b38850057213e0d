// Unit tests run in Node. `@cloudflare/containers` imports the workerd-only module
// `cloudflare:workers`; it is compiled by Vite (not loaded by Node directly) so that the alias
// can point that import at a small stand-in of the two base classes it extends.
import { defineConfig } from "vitest/config";

export default defineConfig({
  resolve: {
    alias: {
      "cloudflare:workers": new URL("./test/cloudflare-workers.ts", import.meta.url).pathname,
    },
  },
  test: {
    include: ["test/**/*.test.ts"],
    server: { deps: { inline: ["@cloudflare/containers"] } },
  },
});
