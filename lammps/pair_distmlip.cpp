/* pair_style distmlip <model> [dtype float32|float64] [device cpu|cuda|cuda:N]
   pair_coeff * * El1 El2 ...

   The C++ half of the pair style: LAMMPS's side (settings, the full neighbour list, ghost
   communication, tallies) and the embedded CPython that runs distmlip/drivers/lammps_pair.py.
   Built by lammps/build.py (`make lammps`), which writes distmlip_config.h: the interpreter, its
   library and the sys.path of the environment that built the plugin. See docs/lammps.md. */

#include <Python.h>

#include "pair_distmlip.h"

#include "atom.h"
#include "comm.h"
#include "domain.h"
#include "error.h"
#include "force.h"
#include "memory.h"
#include "neigh_list.h"
#include "neighbor.h"
#include "update.h"

#include "distmlip_config.h"

#include <cstdint>
#include <cstring>
#include <dlfcn.h>
#include <unistd.h>

using namespace LAMMPS_NS;

namespace {

const char *MODULE = "distmlip.drivers.lammps_pair";
const char *USAGE = "pair_style distmlip <model name or saved model file> [dtype float32|float64] "
                    "[device cpu|cuda|cuda:N]";

//! holds the GIL while in scope (the plugin may run inside a Python that drives LAMMPS)
struct Gil {
  PyGILState_STATE state;
  Gil() : state(PyGILState_Ensure()) {}
  ~Gil() { PyGILState_Release(state); }
};

//! a new reference released at the end of the scope
struct Ref {
  PyObject *p;
  explicit Ref(PyObject *q) : p(q) {}
  ~Ref() { Py_XDECREF(p); }
  Ref(const Ref &) = delete;
  Ref &operator=(const Ref &) = delete;
};

unsigned long long address(const void *p)
{
  return (unsigned long long) (uintptr_t) p;
}

/* The embedded interpreter: the one of the environment that built the plugin (so its
   site-packages, distmlip and torch are found), started once per process. Returns an error
   message, or "" when Python is running. */
std::string start_python()
{
  if (Py_IsInitialized()) return "";
  // extension modules (numpy, torch) resolve libpython's symbols globally
  if (!dlopen(DISTMLIP_LIBPYTHON, RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD))
    dlopen(DISTMLIP_LIBPYTHON, RTLD_NOW | RTLD_GLOBAL);
  PyConfig config;
  PyConfig_InitPythonConfig(&config);
  config.install_signal_handlers = 0;
  config.parse_argv = 0;
  PyStatus status = PyConfig_SetBytesString(&config, &config.program_name, DISTMLIP_PYTHON);
  if (!PyStatus_Exception(status)) status = Py_InitializeFromConfig(&config);
  PyConfig_Clear(&config);
  if (PyStatus_Exception(status))
    return std::string("cannot start the embedded Python ") + DISTMLIP_PYTHON + ": " +
        (status.err_msg ? status.err_msg : "unknown error") +
        "; rebuild the plugin with `make lammps` in the environment that has distmlip";
  // after PYTHONPATH, before the standard library: the checkout that built the plugin, then the
  // environment's site-packages (with their .pth files)
  Ref globals(PyDict_New());
  Ref root(PyUnicode_DecodeFSDefault(DISTMLIP_ROOT));
  Ref sites(PyUnicode_DecodeFSDefault(DISTMLIP_SITE_DIRS));
  PyDict_SetItemString(globals.p, "__builtins__", PyEval_GetBuiltins());
  PyDict_SetItemString(globals.p, "root", root.p);
  PyDict_SetItemString(globals.p, "sites", sites.p);
  const char *code = "import os, site, sys\n"
                     "n = len([p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p])\n"
                     "if root not in sys.path: sys.path.insert(n, root)\n"
                     "for d in filter(None, sites.split(os.pathsep)):\n"
                     "    if d not in sys.path: site.addsitedir(d)\n";
  Ref result(PyRun_String(code, Py_file_input, globals.p, globals.p));
  if (!result.p) {
    PyErr_Print();
    return "cannot set the embedded Python's sys.path";
  }
  return "";
}

}    // namespace

// called by the Python side through ctypes
extern "C" {
static void distmlip_exchange(void *pair, double *rows, int width, int stride, int reverse)
{
  static_cast<PairDistmlip *>(pair)->exchange(rows, width, stride, reverse);
}
static void distmlip_allreduce(void *pair, double *values, int count)
{
  static_cast<PairDistmlip *>(pair)->allreduce(values, count);
}
}

/* ---------------------------------------------------------------------- */

PairDistmlip::PairDistmlip(LAMMPS *lmp) :
    Pair(lmp), driver(nullptr), cutmodel(0.0), commrows(nullptr), commwidth(0), commstride(0)
{
  single_enable = 0;
  restartinfo = 0;
  one_coeff = 1;
  manybody_flag = 1;
  no_virial_fdotr_compute = 1;    // the virial comes from the edge vectors' gradients
  centroidstressflag = CENTROID_NOTAVAIL;
  comm_forward = comm_reverse = comm_reverse_off = MAX_WIDTH;
}

PairDistmlip::~PairDistmlip()
{
  if (driver && Py_IsInitialized()) {
    Gil gil;
    Py_DECREF(driver);
  }
  if (allocated) {
    memory->destroy(setflag);
    memory->destroy(cutsq);
  }
}

void PairDistmlip::allocate()
{
  allocated = 1;
  int n = atom->ntypes + 1;
  memory->create(setflag, n, n, "pair:setflag");
  for (int i = 0; i < n; i++)
    for (int j = 0; j < n; j++) setflag[i][j] = 0;
  memory->create(cutsq, n, n, "pair:cutsq");
}

void PairDistmlip::check_model()
{
  // a failed pair_style leaves no model (LAMMPS driven from Python goes on after an error)
  if (!driver)
    error->all(FLERR, "pair_style distmlip: no model loaded (the pair_style command failed); "
                      "repeat pair_style distmlip with a model that loads");
}

void PairDistmlip::check_units()
{
  if (strcmp(update->unit_style, "metal") != 0)
    error->all(FLERR,
               "pair_style distmlip: expected units metal (Å, eV, ps: the units of distmlip's "
               "models), got units {}; put `units metal` at the top of the input",
               update->unit_style);
}

/* ----------------------------------------------------------------------
   errors: agree() is called by every rank with its error ("" for none): the first failed rank's
   message goes to every rank, which all stop with error->all (rank 0 prints one ERROR line).
   fail_one() is for a rank that fails alone where the others cannot be asked (inside the
   model, between exchanges): it prints its line on stderr itself, unbuffered (LAMMPS prints
   error->one only where a rank has a screen, and the abort may drop buffered output), gives
   mpirun a second to forward it, and aborts the run.
------------------------------------------------------------------------- */

void PairDistmlip::fail_one(const std::string &message)
{
  if (comm->nprocs == 1) error->all(FLERR, "pair_style distmlip: {}", message);
  if (screen) fflush(screen);
  if (logfile) fflush(logfile);
  fprintf(stderr, "ERROR on proc %d: pair_style distmlip: %s\n", comm->me, message.c_str());
  fflush(stderr);
  sleep(1);    // mpirun forwards a rank's output asynchronously: an abort at once may drop it
  MPI_Abort(world, 1);
  _exit(1);    // MPICH's MPI_Abort may return while it stops the other ranks: say nothing more
}

void PairDistmlip::agree(const std::string &message)
{
  int mine = message.empty() ? comm->nprocs : comm->me, first = 0;
  MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, world);
  if (first == comm->nprocs) return;
  std::string text = message;
  int length = (int) text.size();
  MPI_Bcast(&length, 1, MPI_INT, first, world);
  text.resize(length);
  MPI_Bcast(&text[0], length, MPI_CHAR, first, world);
  error->all(FLERR, "pair_style distmlip: {}", text);
}

//! the pending Python exception as one line (distmlip's describe(); a traceback on stderr for
//! an unexpected one)
std::string PairDistmlip::python_error()
{
  PyObject *type, *value, *trace;
  PyErr_Fetch(&type, &value, &trace);
  PyErr_NormalizeException(&type, &value, &trace);
  if (trace && value) PyException_SetTraceback(value, trace);
  Ref t(type), v(value), tb(trace);
  std::string out = "unknown Python error";
  if (!v.p) return out;
  Ref module(PyImport_ImportModule(MODULE));
  Ref text(module.p ? PyObject_CallMethod(module.p, "describe", "O", v.p) : nullptr);
  if (!text.p) {    // distmlip itself does not import: say what did not
    PyErr_Clear();
    Ref name(PyObject_GetAttrString(t.p, "__name__"));
    Ref str(PyObject_Str(v.p));
    const char *n = name.p ? PyUnicode_AsUTF8(name.p) : nullptr;
    const char *s = str.p ? PyUnicode_AsUTF8(str.p) : nullptr;
    PyErr_Clear();
    out = std::string(n ? n : "Error") + ": " + (s ? s : "");
    for (auto &c : out)
      if (c == '\n') c = ' ';
    return out;
  }
  const char *s = PyUnicode_AsUTF8(text.p);
  if (s) out = s;
  PyErr_Clear();
  return out;
}

/* ---------------------------------------------------------------------- */

void PairDistmlip::settings(int narg, char **arg)
{
  if (narg < 1 || narg % 2 == 0)
    error->all(FLERR, "Illegal pair_style distmlip command: expected {}", USAGE);
  std::string dtype, device;
  for (int i = 1; i < narg; i += 2) {
    if (strcmp(arg[i], "dtype") == 0)
      dtype = arg[i + 1];
    else if (strcmp(arg[i], "device") == 0)
      device = arg[i + 1];
    else
      error->all(FLERR, "Illegal pair_style distmlip command: unknown keyword {}; expected {}",
                 arg[i], USAGE);
  }
  check_units();

  std::string message = start_python();
  if (message.empty()) {
    Gil gil;
    Py_CLEAR(driver);
    Ref module(PyImport_ImportModule(MODULE));
    if (!module.p) {
      message = python_error() + "; the embedded Python (" + DISTMLIP_PYTHON +
          ") cannot import distmlip: set PYTHONPATH, or rebuild the plugin with `make lammps` "
          "in the environment that has distmlip";
    } else {
      driver = PyObject_CallMethod(
          module.p, "PairDriver", "sssKKKiii", arg[0], dtype.c_str(), device.c_str(), address(this),
          address((void *) &distmlip_exchange), address((void *) &distmlip_allreduce), MAX_WIDTH,
          comm->me, comm->nprocs);
      if (!driver) message = python_error();
      if (driver) {
        Ref cut(PyObject_GetAttrString(driver, "cutoff"));
        cutmodel = cut.p ? PyFloat_AsDouble(cut.p) : -1.0;
        if (PyErr_Occurred()) message = python_error();
      }
    }
    if (!message.empty()) Py_CLEAR(driver);
  }
  agree(message);
}

void PairDistmlip::coeff(int narg, char **arg)
{
  check_model();
  if (!allocated) allocate();
  int ntypes = atom->ntypes;
  if (narg < 2 || strcmp(arg[0], "*") != 0 || strcmp(arg[1], "*") != 0 || narg != 2 + ntypes)
    error->all(FLERR,
               "pair_coeff distmlip: expected `pair_coeff * * El1 ... El{}`, one element for each "
               "of the {} atom types, got {} argument(s) after pair_coeff; map every type to an "
               "element (e.g. pair_coeff * * Cu)",
               ntypes, ntypes, narg);
  std::string message;
  {
    Gil gil;
    Ref elements(PyList_New(ntypes));
    for (int i = 0; i < ntypes; i++)
      PyList_SET_ITEM(elements.p, i, PyUnicode_FromString(arg[2 + i]));
    Ref done(PyObject_CallMethod(driver, "set_elements", "O", elements.p));
    if (!done.p) message = python_error();
  }
  agree(message);
  for (int i = 1; i <= ntypes; i++)
    for (int j = i; j <= ntypes; j++) setflag[i][j] = 1;
}

void PairDistmlip::init_style()
{
  check_units();
  check_model();
  neighbor->add_request(this, NeighConst::REQ_FULL);
  // comm buffers are sized now: the widest exchange, never wider later
  comm_forward = comm_reverse = comm_reverse_off = MAX_WIDTH;
  std::string message;
  {
    Gil gil;
    Ref done(PyObject_CallMethod(driver, "check", nullptr));    // the mapped elements, once
    if (!done.p) message = python_error();
  }
  agree(message);
}

double PairDistmlip::init_one(int, int)
{
  return cutmodel;
}

/* ---------------------------------------------------------------------- */

void PairDistmlip::compute(int eflag, int vflag)
{
  ev_init(eflag, vflag);
  int nlocal = atom->nlocal;
  int nall = nlocal + atom->nghost;
  double **x = atom->x;

  // edges sender j -> receiver i (a local atom) within the model's cutoff; vectors x[j] - x[i]
  // from the ghosts' own positions, so no periodic shifts are needed
  senders.clear();
  receivers.clear();
  vectors.clear();
  double cut2 = cutmodel * cutmodel;
  for (int ii = 0; ii < list->inum; ii++) {
    int i = list->ilist[ii];
    int *jlist = list->firstneigh[i];
    for (int jj = 0; jj < list->numneigh[i]; jj++) {
      int j = jlist[jj] & NEIGHMASK;
      double dx = x[j][0] - x[i][0], dy = x[j][1] - x[i][1], dz = x[j][2] - x[i][2];
      if (dx * dx + dy * dy + dz * dz < cut2) {
        senders.push_back(j);
        receivers.push_back(i);
        vectors.push_back(dx);
        vectors.push_back(dy);
        vectors.push_back(dz);
      }
    }
  }
  double h[9] = {domain->xprd, 0.0, 0.0, domain->xy, domain->yprd, 0.0, domain->xz, domain->yz,
                 domain->zprd};
  double energy = 0.0, v[6] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  std::string message;
  {    // the atoms and edges, checked before any communication: every rank stops alike
    Gil gil;
    Ref done(PyObject_CallMethod(driver, "prepare", "iiKKiiKKK(ddddddddd)", nlocal, nall,
                                 address(atom->type), address(atom->tag), (int) sizeof(tagint),
                                 (int) receivers.size(), address(senders.data()),
                                 address(receivers.data()), address(vectors.data()), h[0], h[1],
                                 h[2], h[3], h[4], h[5], h[6], h[7], h[8]));
    if (!done.p) message = python_error();
  }
  agree(message);
  {
    Gil gil;
    Ref result(PyObject_CallMethod(driver, "compute", "iKKK", force->newton_pair,
                                   address(nall ? atom->f[0] : nullptr),
                                   address(eflag_atom ? eatom : nullptr),
                                   address(vflag_atom && nall ? vatom[0] : nullptr)));
    if (!result.p || !PyArg_ParseTuple(result.p, "ddddddd", &energy, &v[0], &v[1], &v[2], &v[3],
                                       &v[4], &v[5]))
      message = python_error();
  }
  if (!message.empty()) fail_one(message);    // the model failed on this rank: it stops the run
  if (eflag_global) eng_vdwl += energy;
  if (vflag_global)
    for (int k = 0; k < 6; k++) virial[k] += v[k];
}

/* ----------------------------------------------------------------------
   the halo exchange: commwidth doubles per atom, the row of atom i at commrows + i * commstride
   (a column block of a wider array: no copy of the block)
------------------------------------------------------------------------- */

void PairDistmlip::exchange(double *rows, int width, int stride, int reverse)
{
  if (width < 1 || width > MAX_WIDTH || stride < width)
    error->one(FLERR, "pair_style distmlip: exchange of {} doubles per atom (rows of {}), "
               "expected 1-{}", width, stride, MAX_WIDTH);
  commrows = rows;
  commwidth = width;
  commstride = stride;
  if (reverse)
    comm->reverse_comm(this, width);
  else
    comm->forward_comm(this, width);
  commrows = nullptr;
}

void PairDistmlip::allreduce(double *values, int count)
{
  MPI_Allreduce(MPI_IN_PLACE, values, count, MPI_DOUBLE, MPI_SUM, world);
}

int PairDistmlip::pack_forward_comm(int n, int *list, double *buf, int, int *)
{
  const int w = commwidth;
  const size_t s = commstride;
  for (int i = 0; i < n; i++) memcpy(buf + (size_t) i * w, commrows + list[i] * s, w * sizeof(double));
  return n * w;
}

void PairDistmlip::unpack_forward_comm(int n, int first, double *buf)
{
  const int w = commwidth;
  const size_t s = commstride;
  for (int i = 0; i < n; i++)
    memcpy(commrows + (first + i) * s, buf + (size_t) i * w, w * sizeof(double));
}

int PairDistmlip::pack_reverse_comm(int n, int first, double *buf)
{
  const int w = commwidth;
  const size_t s = commstride;
  for (int i = 0; i < n; i++)
    memcpy(buf + (size_t) i * w, commrows + (first + i) * s, w * sizeof(double));
  return n * w;
}

void PairDistmlip::unpack_reverse_comm(int n, int *list, double *buf)
{
  const int w = commwidth;
  const size_t s = commstride;
  for (int i = 0; i < n; i++) {
    double *row = commrows + list[i] * s;
    for (int k = 0; k < w; k++) row[k] += buf[(size_t) i * w + k];
  }
}
