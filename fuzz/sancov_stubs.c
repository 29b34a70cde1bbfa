/* gcc's -fsanitize-coverage=trace-cmp also traces float and double comparisons, which
 * libFuzzer has no hooks for: these take them (make fuzz preloads this beside
 * asan_with_fuzzer.so, so that the decoder built for fuzzing loads). */
void __sanitizer_cov_trace_cmpf(float a, float b) { (void)a; (void)b; }
void __sanitizer_cov_trace_cmpd(double a, double b) { (void)a; (void)b; }
