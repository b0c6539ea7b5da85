// AudioWorklet: turns microphone input at the context rate into 1 s chunks of 16 kHz mono float32.
// Each chunk is posted to the main thread as a Float32Array of exactly `chunkSamples` samples.

const TARGET_RATE = 16000;

class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.chunkSamples = (options.processorOptions && options.processorOptions.chunkSamples) || TARGET_RATE;
    // Input samples per output sample (3 for a 48 kHz context). `sampleRate` is the context rate.
    this.step = sampleRate / TARGET_RATE;
    this.nextBoundary = this.step; // input position where the current output sample ends
    this.inputPos = 0;
    this.sum = 0;
    this.count = 0;
    this.last = 0;
    this.chunk = new Float32Array(this.chunkSamples);
    this.filled = 0;
  }

  emit(sample) {
    this.chunk[this.filled++] = sample;
    if (this.filled === this.chunkSamples) {
      this.port.postMessage(this.chunk, [this.chunk.buffer]);
      this.chunk = new Float32Array(this.chunkSamples);
      this.filled = 0;
    }
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (!channel) return true; // no input connected yet
    // Resample by averaging the input samples that fall into each output sample (a box low-pass,
    // enough against aliasing for speech); when upsampling, the last value is repeated.
    for (let i = 0; i < channel.length; i++) {
      this.sum += channel[i];
      this.count++;
      this.inputPos++;
      while (this.inputPos >= this.nextBoundary) {
        if (this.count > 0) this.last = this.sum / this.count;
        this.emit(this.last);
        this.sum = 0;
        this.count = 0;
        this.nextBoundary += this.step;
      }
    }
    return true;
  }
}

registerProcessor('capture-16k', CaptureProcessor);
