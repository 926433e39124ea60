// One thread of the CPU path's pool (the threaded build, pkg/threads/; worker.js starts these): instantiates the
// module on the model worker's shared memory, says so, then runs one of rayon's threads for good.
self.onmessage = async ({ data }) => {
  try {
    const lib = await import(data.url);
    await lib.default(data.init);
    self.postMessage({ ready: true });
    lib.runThread();
  } catch (e) {
    self.postMessage({ error: e?.message || String(e) });
  }
};
