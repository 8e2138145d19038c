/* pair_style distmlip: any distmlip model across LAMMPS's own MPI ranks.

   Each rank evaluates its local atoms (the owned rows of a distmlip LocalGraph) with LAMMPS's
   ghost atoms as the halo rows. The model runs in an embedded CPython (the Python side is
   distmlip/drivers/lammps_pair.py); its halo exchange between layers is LAMMPS's forward
   communication (owners -> ghosts) and the exchange's backward pass the reverse communication
   (ghosts -> owners, summed). See docs/lammps.md. */

#ifdef PAIR_CLASS
// clang-format off
PairStyle(distmlip,PairDistmlip);
// clang-format on
#else

#ifndef LMP_PAIR_DISTMLIP_H
#define LMP_PAIR_DISTMLIP_H

#include "pair.h"

#include <string>
#include <vector>

typedef struct _object PyObject;    // Python.h stays out of the header

namespace LAMMPS_NS {

class PairDistmlip : public Pair {
 public:
  //! widest exchange in doubles per atom (comm buffers are sized for it in init_style); the
  //! Python side splits wider node features into chunks of at most this width
  static constexpr int MAX_WIDTH = 256;

  PairDistmlip(class LAMMPS *);
  ~PairDistmlip() override;

  void compute(int, int) override;
  void settings(int, char **) override;
  void coeff(int, char **) override;
  void init_style() override;
  double init_one(int, int) override;

  int pack_forward_comm(int, int *, double *, int, int *) override;
  void unpack_forward_comm(int, int, double *) override;
  int pack_reverse_comm(int, int, double *) override;
  void unpack_reverse_comm(int, int *, double *) override;

  //! called by the Python side (through ctypes): width doubles per atom for each of the
  //! nlocal + nghost atoms, atom i's at rows + i * stride; forward copies owned rows into their
  //! ghosts, reverse adds ghost rows to their owners
  void exchange(double *rows, int width, int stride, int reverse);
  //! sum over LAMMPS's ranks, in place
  void allreduce(double *values, int count);

 protected:
  PyObject *driver;    // distmlip.drivers.lammps_pair.PairDriver
  double cutmodel;     // the model's cutoff, Å
  double *commrows;    // what exchange() moves: (nlocal + nghost) rows of commwidth
  int commwidth;       // doubles, commstride apart
  int commstride;
  std::vector<int> senders, receivers;
  std::vector<double> vectors;

  void allocate();
  void check_units();
  void check_model();
  [[noreturn]] void fail_one(const std::string &message);
  void agree(const std::string &message);
  std::string python_error();
};

}    // namespace LAMMPS_NS

#endif
#endif
