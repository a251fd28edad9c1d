/* The MPI side of Sheaf's collective comparisons (issue 10, item 5): MPI_Allreduce
 * of f32 sums over the sizes `sheaf bench collectives` uses, timed the same way
 * (a warm-up, then enough runs for about 30 ms per size, mean time per call) and
 * printed as the same columns. Built and run by `benches/reference/transport.sh`;
 * never by CI.
 *
 *   mpicc -O2 -o mpi_allreduce mpi_allreduce.c
 *   mpirun --allow-run-as-root -np 2 --mca btl tcp,self --mca btl_tcp_if_include lo ./mpi_allreduce
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, world;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world);
    size_t min_bytes = argc > 1 ? strtoull(argv[1], 0, 10) : 4096;
    size_t max_bytes = argc > 2 ? strtoull(argv[2], 0, 10) : (16u << 20);
    float *buf = malloc(max_bytes), *out = malloc(max_bytes);
    if (rank == 0)
        printf("%14s %12s %14s %12s %12s  allreduce / mpi / world %d\n", "size(B)", "count",
               "time(us)", "algbw(GB/s)", "busbw(GB/s)", world);
    for (size_t bytes = min_bytes; bytes <= max_bytes; bytes *= 2) {
        int count = (int)(bytes / 4);
        for (int i = 0; i < count; i++) buf[i] = (float)(rank + i % 7);
        for (int w = 0; w < 3; w++)
            MPI_Allreduce(buf, out, count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
        /* How many runs: about 30 ms, judged from one, agreed by rank 0. */
        MPI_Barrier(MPI_COMM_WORLD);
        double t = MPI_Wtime();
        MPI_Allreduce(buf, out, count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
        t = MPI_Wtime() - t;
        int iters = (int)(0.03 / (t > 1e-7 ? t : 1e-7));
        if (iters < 10) iters = 10;
        if (iters > 100000) iters = 100000;
        MPI_Bcast(&iters, 1, MPI_INT, 0, MPI_COMM_WORLD);
        MPI_Barrier(MPI_COMM_WORLD);
        t = MPI_Wtime();
        for (int i = 0; i < iters; i++)
            MPI_Allreduce(buf, out, count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
        t = (MPI_Wtime() - t) / iters;
        double worst;
        MPI_Reduce(&t, &worst, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
        int ok = 1;
        for (int i = 0; i < count; i++) {
            float want = 0;
            for (int r = 0; r < world; r++) want += (float)(r + i % 7);
            if (out[i] != want) { ok = 0; break; }
        }
        if (rank == 0) {
            double algbw = bytes / worst / 1e9;
            printf("%14zu %12d %14.2f %12.3f %12.3f  %5s  allreduce\n", bytes, count, worst * 1e6, algbw,
                   algbw * 2.0 * (world - 1) / world, ok ? "ok" : "WRONG");
        }
    }
    free(buf);
    free(out);
    MPI_Finalize();
    return 0;
}
